"""Deployment files, checked without a Docker engine or a cluster (issue 12).

- docker-compose.yml: ``docker-compose config`` (Debian's docker-compose, no engine needed) accepts
  it with every profile and rejects a broken copy; the keys the deployment relies on are there.
- Dockerfiles: hadolint; every file they copy exists; the versions and extras they install agree
  with pyproject.toml; the stages compose builds exist.
- docker/haproxy.cfg: ``haproxy -c``; its backends are the compose services.
- deploy/k8s: parsed, validated against the Kubernetes schemas (kubernetes-validate, strict) and
  structurally (rolling update, probes on the routes the app serves, resources, GPU variant,
  Redis, KServe), consistent with the Dockerfiles.
- docker/train.sh (the train image's entry point) trains, exports and versions a bundle.
- The prebuilt native op loads from a read-only folder without a compiler.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.service_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.gpu"]
K8S = REPO / "deploy" / "k8s"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
READY, LIVE = "/v2/health/ready", "/v2/health/live"
PROFILES = [None, "train", "loadtest", "gpu"]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it; see docs/DEPLOY.md)")
    return path


def _run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# ---- docker-compose ----------------------------------------------------------------------------


def _compose_config(path: Path, profile: str | None) -> subprocess.CompletedProcess:
    exe = _tool("docker-compose")
    args = [exe, "-f", str(path), "--project-directory", str(path.parent)]
    if profile:
        args += ["--profile", profile]
    return _run([*args, "config"], cwd=path.parent)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The file as docker-compose resolves it (anchors merged, defaults substituted)."""
    res = _compose_config(COMPOSE, None)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


@pytest.mark.parametrize("profile", PROFILES, ids=[p or "default" for p in PROFILES])
def test_compose_config_accepts_every_profile(profile):
    res = _compose_config(COMPOSE, profile)
    assert res.returncode == 0, res.stderr
    assert "services" in yaml.safe_load(res.stdout)


def test_compose_config_rejects_a_broken_file(tmp_path):
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["api"]["healthcheck"]["retries"] = "three"
    broken["services"]["api"]["stop_grace_periodd"] = "30s"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    res = _compose_config(path, None)
    assert res.returncode != 0
    assert "stop_grace_periodd" in res.stderr or "retries" in res.stderr


def _profiles(svc: dict) -> list[str]:
    return list(svc.get("profiles") or [])


def test_compose_services_and_profiles(compose):
    services = compose["services"]
    default = {n for n, s in services.items() if not _profiles(s)}
    assert default == {"redis", "api", "proxy"}, "`docker compose up` must serve the demo model"
    assert _profiles(services["train"]) == ["train"]
    assert _profiles(services["locust-master"]) == ["loadtest"]
    assert _profiles(services["locust-worker"]) == ["loadtest"]
    assert _profiles(services["api-gpu"]) == ["gpu"]


def test_compose_redis(compose):
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:\d+(\.\d+)*(-alpine)?", redis["image"]), "the official image"
    cmd = redis["command"]
    assert cmd[0] == "redis-server" and cmd[cmd.index("--appendonly") + 1] == "yes"
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in _volumes(redis))


def _volumes(svc: dict) -> list[dict]:
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):  # short form "source:target[:mode]"
            src, tgt, *_ = v.split(":")
            v = {"source": src, "target": tgt, "type": "bind" if src[:1] in "./" else "volume"}
        out.append(v)
    return out


@pytest.mark.parametrize("name", ["api", "api-gpu"])
def test_compose_api(compose, name):
    api = compose["services"][name]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert {"source": "bundles", "target": "/models"}.items() <= _volumes(api)[0].items()
    check = api["healthcheck"]["test"]
    assert check[:2] == ["CMD", "python"] and check[2] == "/opt/lma/healthcheck.py"
    limits = api["deploy"]["resources"]["limits"]
    assert limits["cpus"] and limits["memory"]
    assert api["stop_grace_period"]
    assert "ports" not in api, "a fixed host port would break --scale api=N; the proxy publishes"
    env = api["environment"]
    assert env["LMA_SERVE_HOST"] == "0.0.0.0" and env["LMA_SERVE_PORT"] == "8000"
    assert env["REDIS_URL"].startswith("redis://redis:")
    assert api["command"][0] == "/models"


def test_compose_gpu_reservation(compose):
    api = compose["services"]["api-gpu"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert api["environment"]["LMA_SERVE_DEVICE"] == "cuda"
    assert api["command"][api["command"].index("--device") + 1] == "cuda"
    assert api["build"]["dockerfile"].endswith("docker/Dockerfile.gpu")


def test_compose_train_writes_the_served_volume(compose):
    train = compose["services"]["train"]
    assert train["build"]["target"] == "train"
    vols = {v["target"]: v for v in _volumes(train)}
    assert vols["/models"]["source"] == "bundles"
    assert vols["/data"]["source"] == "datasets"  # LMA_DATASET swaps in a host folder
    assert train["environment"]["LMA_TRAIN_DATA"].startswith("synth:")
    assert train["command"][0] == "/models"


def test_compose_loadtest_points_at_the_proxy(compose):
    master = compose["services"]["locust-master"]
    worker = compose["services"]["locust-worker"]
    assert master["build"]["target"] == "loadtest"
    assert "--master" in master["command"]
    assert master["command"][master["command"].index("--host") + 1] == "http://proxy:8000"
    assert "--worker" in worker["command"]
    assert worker["command"][worker["command"].index("--master-host") + 1] == "locust-master"


def test_compose_proxy_and_haproxy_config(compose):
    proxy = compose["services"]["proxy"]
    assert proxy["image"].startswith("haproxy:")
    mounts = {v["target"]: v["source"] for v in _volumes(proxy)}
    src = Path(mounts["/usr/local/etc/haproxy/haproxy.cfg"])
    assert src.resolve() == (REPO / "docker" / "haproxy.cfg").resolve()
    assert any(str(p.get("target")) == "8000" or str(p).endswith(":8000") for p in proxy["ports"])
    cfg = src.read_text()
    templates = re.findall(r"server-template\s+\S+\s+\d+\s+([\w-]+):(\d+)", cfg)
    assert {h for h, _ in templates} == {"api", "api-gpu"} <= set(compose["services"])
    assert all(port == "8000" for _, port in templates)
    assert f"uri {READY}" in cfg


def test_haproxy_config_is_valid():
    res = _run([_tool("haproxy"), "-c", "-f", str(REPO / "docker" / "haproxy.cfg")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_paths_exist(compose):
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            context = Path(build["context"])
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
            if "target" in build:
                assert build["target"] in _stages(dockerfile), f"{name}: no stage {build['target']}"
        for v in _volumes(svc):
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), f"{name}: {v['source']}"


def _service_landed() -> bool:
    return "serve" in PYPROJECT["project"].get("entry-points", {}).get("lma.commands", {})


# ---- Dockerfiles -------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in path.read_text().splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            cur = ""
    return out


def _stages(path: Path) -> set[str]:
    return {m.group(1) for k, a in _instructions(path) if (m := re.search(r"\bAS\s+(\S+)$", a))}


def _stage_instructions(path: Path, stage: str) -> list[tuple[str, str]]:
    out, inside = [], False
    for k, a in _instructions(path):
        if k == "FROM":
            inside = a.endswith(f" AS {stage}")
            continue
        if inside:
            out.append((k, a))
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    exe = _tool("hadolint")
    cfg = REPO / "docker" / "hadolint.yaml"
    res = _run([exe, "--config", str(cfg), "--failure-threshold", "info", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    exe = _tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install .\n")
    res = _run([exe, "--config", str(REPO / "docker" / "hadolint.yaml"), str(bad)])
    assert res.returncode != 0 and "DL3007" in res.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_exist_and_pins_agree(path):
    text = path.read_text()
    for kind, args in _instructions(path):
        if kind == "COPY" and "--from=" not in args:
            *sources, _dest = [a for a in args.split() if not a.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), f"{path.name}: COPY {src} does not exist"
    pins = {}
    for spec in sum(PYPROJECT["project"]["optional-dependencies"].values(), []):
        name, _, version = spec.partition("==")
        pins[name.lower()] = version
    for arg, pkg in (("TORCH_VERSION", "torch"), ("NINJA_VERSION", "ninja")):
        for value in re.findall(rf"ARG {arg}=(\S+)", text):
            assert value == pins[pkg], (
                f"{path.name}: {arg}={value}, pyproject pins {pkg}=={pins[pkg]}"
            )
    extras = PYPROJECT["project"]["optional-dependencies"]
    for group in re.findall(r'pip install [^\n]*?"\.\[([\w,-]+)\]"', text):
        for extra in group.split(","):
            if extra == "serve-gpu" and extra not in extras and not _service_landed():
                pytest.skip("the serve-gpu extra comes with the service (issue 8), not on main yet")
            assert extra in extras, f"{path.name}: extra {extra!r} is not in pyproject.toml"
    assert "onnxruntime-gpu" not in " ".join(extras.get("serve", [])), "never both flavours"


def test_serving_image_runs_as_non_root_with_prebuilt_op():
    cpu, gpu = DOCKERFILES
    for path in (cpu, gpu):
        serve = dict(_stage_instructions(path, "serve"))
        assert serve["USER"] == "10001"
        assert "HEALTHCHECK" in serve and "/opt/lma/healthcheck.py" in serve["HEALTHCHECK"]
        assert json.loads(serve["ENTRYPOINT"]) == ["lma", "serve"]
        assert "LMA_TORCH_EXT_PREBUILT=1" in serve["ENV"]
        assert "LMA_TORCH_EXT_DIR=/opt/lma/torch_ext" in serve["ENV"]
        assert "LMA_SERVE_HOST=0.0.0.0" in serve["ENV"]
        assert serve["VOLUME"] == '["/models"]'
        # The training stack never reaches the serving image: only the venv built from the
        # serving extras and the demo bundle's files are copied in.
        copies = [a for k, a in _stage_instructions(path, "serve") if k == "COPY"]
        assert all("--from=train" not in c for c in copies)
    cpu_serve = dict(_stage_instructions(cpu, "serve"))
    assert json.loads(cpu_serve["CMD"]) == ["/models"]
    assert json.loads(dict(_stage_instructions(gpu, "serve"))["CMD"]) == [
        "/models",
        "--device",
        "cuda",
    ]
    build = " ".join(a for k, a in _stage_instructions(cpu, "build") if k == "RUN")
    assert 'pip install ".[serve]"' in build and "[train" not in build
    assert "python -m lma.ops.build" in build
    python = re.search(r"ARG PYTHON_IMAGE=python:(\d+\.\d+)", cpu.read_text()).group(1)
    assert python == "3.11", "the project's Python"
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-cudnn-runtime-", gpu.read_text())


# CUDA (major, minor) and cuDNN major each GPU package version is built for, read from the
# wheels' metadata (`pip install --dry-run --report` of the cp312 manylinux wheels, 2026-12-01):
# torch 2.13.0 requires cuda-toolkit==13.0.3 and nvidia-cudnn-cu13==9.20.0.48; onnxruntime-gpu
# 1.31.1's cuda/cudnn extras require nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13~=9.0.
# A version bump must add its row after the same check.
GPU_BUILDS = {
    ("torch", "2.13.0"): ((13, 0), 9),
    ("onnxruntime-gpu", "1.31.1"): ((13, 0), 9),
}


def _gpu_versions() -> tuple[tuple[int, int], str, str]:
    text = DOCKERFILES[1].read_text()
    m = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu[\d.]+\n", text)
    assert m, "Dockerfile.gpu: CUDA_IMAGE must be an nvidia/cuda X.Y.Z-cudnn-runtime tag"
    torch_version = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    ort = next(s for s in PYPROJECT["project"]["optional-dependencies"]["serve-gpu"]
               if s.startswith("onnxruntime-gpu=="))
    return (int(m.group(1)), int(m.group(2))), torch_version, ort.partition("==")[2]


def test_gpu_image_cuda_versions_agree():
    """The GPU image's CUDA base, torch's CUDA build and onnxruntime-gpu's CUDA build share a
    CUDA major version (the base's minor at least the builds'), and the base's cuDNN (9 in every
    `-cudnn-` tag of CUDA 12.4 and later) is the one both were built against."""
    base, torch_version, ort_version = _gpu_versions()
    for pkg, version in (("torch", torch_version), ("onnxruntime-gpu", ort_version)):
        assert (pkg, version) in GPU_BUILDS, (
            f"{pkg}=={version}: add its CUDA/cuDNN build to GPU_BUILDS after checking its wheel")
        (major, minor), cudnn = GPU_BUILDS[(pkg, version)]
        assert major == base[0] and minor <= base[1], (
            f"{pkg}=={version} is built for CUDA {major}.{minor}; the base is CUDA {base}")
        assert cudnn == 9, f"{pkg}=={version} needs cuDNN {cudnn}; the -cudnn- base has 9"


def test_gpu_builds_table_matches_installed_metadata():
    """Where a GPU build is installed (a GPU host), its metadata says what GPU_BUILDS says."""
    import importlib.metadata as md

    checked = 0
    try:
        reqs = md.requires("onnxruntime-gpu") or []
        version = md.version("onnxruntime-gpu")
    except md.PackageNotFoundError:
        reqs = []
    for r in reqs:
        if m := re.match(r"nvidia-cuda-runtime(?:-cu\d+)?\s*~=\s*(\d+)\.(\d+)", r):
            want = GPU_BUILDS[("onnxruntime-gpu", version)][0]
            assert (int(m.group(1)), int(m.group(2))) == want
            checked += 1
    import torch

    if torch.version.cuda:
        want = GPU_BUILDS[("torch", torch.__version__.split("+")[0])][0]
        assert tuple(int(x) for x in torch.version.cuda.split(".")[:2]) == want
        checked += 1
    if not checked:
        pytest.skip("no CUDA build of torch or onnxruntime-gpu is installed here")


def test_train_stage_entry_point():
    train = dict(_stage_instructions(DOCKERFILES[0], "train"))
    assert json.loads(train["ENTRYPOINT"]) == ["lma-train-bundle"]
    assert "docker/train.sh /usr/local/bin/lma-train-bundle" in train["COPY"]


# ---- the train and serving images' entry points, run here -----------------------------------


@pytest.fixture(scope="module")
def trained_repo(tmp_path_factory) -> Path:
    """A model repository written by docker/train.sh, as the compose `train` service does."""
    tmp = tmp_path_factory.mktemp("train")
    bindir = tmp / "bin"
    bindir.mkdir()
    shim = bindir / "lma"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lma.cli "$@"\n')
    shim.chmod(0o755)
    repo = tmp / "models"
    (repo / "demo" / "3").mkdir(parents=True)  # an existing version: the new one must be 4
    env = dict(
        os.environ,
        PATH=f"{bindir}:{os.environ['PATH']}",
        PYTHONPATH=str(REPO),
        LMA_TRAIN_ROWS="3000",
        LMA_TRAIN_EPOCHS="1",
        LMA_TRAIN_BATCH_SIZE="512",
    )
    res = subprocess.run(
        ["bash", str(REPO / "docker" / "train.sh"), str(repo), "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return repo


def test_train_script_writes_the_next_bundle_version(trained_repo):
    bundle = trained_repo / "demo" / "4"
    assert (bundle / "manifest.json").is_file(), sorted(p.name for p in bundle.iterdir())
    assert sorted(p.name for p in (trained_repo / "demo").iterdir()) == ["3", "4"], "no leftovers"


def test_entry_point_and_healthcheck_in_a_serving_only_venv(trained_repo, tmp_path):
    """The serving image's ENTRYPOINT/CMD (`lma serve /models`) and HEALTHCHECK, run directly
    in a fresh virtual environment holding this package with the `serve` extra alone."""
    if not _service_landed():
        pytest.skip("the service (issue 8) is not on main yet")
    repo = tmp_path / "models"
    shutil.copytree(trained_repo / "demo" / "4", repo / "demo" / "1")
    # Install from exactly what the serving image's build stage copies (this also checks that
    # its COPY lines bring everything the package needs), not from the checkout in place.
    src = tmp_path / "src"
    copies = [a for k, a in _stage_instructions(DOCKERFILES[0], "build") if k == "COPY"]
    for args in copies:
        *sources, _dest = args.split()
        for name in sources:
            if (REPO / name).is_dir():
                shutil.copytree(
                    REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                src.mkdir(exist_ok=True)
                shutil.copy2(REPO / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    res = _run([str(py), "-m", "pip", "install", "-q", f"{src}[serve]"], timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for heavy in ("torch", "onnx", "lma.train"):
        probe = _run([str(py), "-c", f"import {heavy}"], cwd=tmp_path)
        assert probe.returncode != 0, f"{heavy} is importable from the serving extras alone"
    # The build stage compiles the onnxruntime LMA ops into their folder (from the installed
    # package's sources); the serving stage uses them from there, without a compiler.
    ort_ops_dir = tmp_path / "ort_ops"
    res = _run([str(py), "-m", "lma.ort_ops", "--quiet"], cwd=tmp_path,
               env={**os.environ, "LMA_ORT_OPS_DIR": str(ort_ops_dir)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMA_", "PYTHON"))}
    env.update(  # the serving image's ENV, with a loopback address and a free port
        PATH=f"{venv / 'bin'}:/bin",
        CXX="/nonexistent/c++",
        LMA_TORCH_EXT_PREBUILT="1",
        LMA_ORT_OPS_DIR=str(ort_ops_dir),
        LMA_SERVE_HOST="127.0.0.1",
        LMA_SERVE_PORT=str(port),
        LMA_SERVE_DEVICE="cpu",
        LMA_SERVE_THREADS="1",
    )
    health = [str(py), str(REPO / "docker" / "healthcheck.py")]
    assert _run(health, env=env, cwd=tmp_path).returncode == 1, "healthy before the server runs"
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [str(venv / "bin" / "lma"), "serve", str(repo)],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _run(health, env=env, cwd=tmp_path).returncode != 0:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        body = json.dumps({"instances": [{"I1": 3, "C1": "68fd1e64"}, {}]}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models/demo:predict",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            answer = json.loads(r.read())
        assert len(answer["predictions"]) == 2
        assert all(0.0 < p < 1.0 for p in answer["predictions"])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/demo", timeout=10) as r:
            assert json.loads(r.read())["native_ops"] is True  # the prebuilt library, used
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete (status 143 in Docker).
    text = (tmp_path / "server.log").read_text()
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in text, text
    assert _run(health, env=env, cwd=tmp_path).returncode == 1, "healthy after the server stopped"


# ---- Kubernetes ----------------------------------------------------------------------------------


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            out[(doc["kind"], doc.get("metadata", {}).get("name", path.name))] = doc
    return out


def test_k8s_schema_validation():
    exe = _tool("kubernetes-validate")
    files = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    files.remove(str(K8S / "kserve-inferenceservice.yaml"))  # a CRD: checked structurally below
    res = _run([exe, "--strict", *files])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "passed" in res.stdout and "failed" not in res.stdout.lower()


def test_k8s_schema_validation_catches_a_typo(tmp_path):
    exe = _tool("kubernetes-validate")
    doc = _docs(K8S / "api.yaml")[0]
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe") | {"periodSecs": 5}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = _run([exe, "--strict", str(path)])
    assert res.returncode != 0


def test_kustomization_lists_existing_files():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res


def _container(deploy: dict) -> dict:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _pod_env(k8s: dict, container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps (which must be in
    deploy/k8s), then env entries over them."""
    out: dict[str, str] = {}
    for src in container.get("envFrom", []):
        name = src["configMapRef"]["name"]
        assert ("ConfigMap", name) in k8s, f"envFrom names ConfigMap {name!r}, not in deploy/k8s"
        out.update(k8s[("ConfigMap", name)]["data"])
    return {**out, **_env(container)}


def _probe_path(container: dict, probe: str) -> str:
    return container[probe]["httpGet"]["path"]


@pytest.mark.parametrize("name", ["lma-api", "lma-api-gpu"])
def test_k8s_deployment(k8s, name):
    dep = k8s[("Deployment", name)]
    strategy = dep["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert (
        strategy["rollingUpdate"]["maxUnavailable"] == 0
        and strategy["rollingUpdate"]["maxSurge"] >= 1
    )
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    c = _container(dep)
    assert _probe_path(c, "readinessProbe") == READY
    assert _probe_path(c, "livenessProbe") == LIVE
    assert _probe_path(c, "startupProbe") == READY
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    env = _env(c)
    assert str(port) == env["LMA_SERVE_PORT"] and env["LMA_SERVE_HOST"] == "0.0.0.0"
    res = c["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"]
    assert res["limits"]["cpu"] and res["limits"]["memory"]
    # The image's entry point, with the model repository mounted where the image expects it.
    assert c["command"] == ["lma", "serve"] and c["args"][0] == "/models"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert ("PersistentVolumeClaim", claims[mounts["/models"]["name"]]) in k8s
    sec = pod["spec"]["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == 10001  # the image's USER
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts
    host = re.match(r"redis://([\w.-]+):6379", _pod_env(k8s, c)["REDIS_URL"]).group(1)
    assert ("Service", host) in k8s and ("StatefulSet", host) in k8s, "the same Redis"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 30


def test_k8s_images_match_compose(k8s, compose):
    assert (
        _container(k8s[("Deployment", "lma-api")])["image"] == compose["services"]["api"]["image"]
    )
    gpu = _container(k8s[("Deployment", "lma-api-gpu")])
    assert gpu["image"] == compose["services"]["api-gpu"]["image"]
    assert gpu["args"][gpu["args"].index("--device") + 1] == "cuda"
    assert _env(gpu)["LMA_SERVE_DEVICE"] == "cuda"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_k8s_service_and_pdb_select_the_api(k8s):
    labels = k8s[("Deployment", "lma-api")]["spec"]["template"]["metadata"]["labels"]
    gpu_labels = k8s[("Deployment", "lma-api-gpu")]["spec"]["template"]["metadata"]["labels"]
    svc = k8s[("Service", "lma-api")]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= gpu_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    pdb = k8s[("PodDisruptionBudget", "lma-api")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < k8s[("Deployment", "lma-api")]["spec"]["replicas"]


def test_k8s_redis(k8s):
    sts = k8s[("StatefulSet", "redis")]
    c = _container(sts)
    assert c["image"] == "redis:7.4-alpine"
    assert c["args"][c["args"].index("--appendonly") + 1] == "yes"
    assert c["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_k8s_train_job(k8s, compose):
    """The training Job: compose's train image and arguments, only settings docker/train.sh
    reads, the model repository claim mounted writable, then a reload message for the model it
    trained on the channel and Redis the serving replicas share."""
    job = k8s[("Job", "lma-train")]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (train,) = pod["initContainers"]
    assert train["image"] == compose["services"]["train"]["image"]
    repo, name = train["args"]
    assert repo == "/models" and compose["services"]["train"]["command"][0] == repo
    read = set(re.findall(r"LMA_TRAIN_\w+", (REPO / "docker" / "train.sh").read_text()))
    assert set(_env(train)) <= read, f"train.sh does not read {set(_env(train)) - read}"
    mount = {m["mountPath"]: m for m in train["volumeMounts"]}["/models"]
    assert not mount.get("readOnly")
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims[mount["name"]] == "lma-bundles" and ("PersistentVolumeClaim", "lma-bundles") in k8s
    (publish,) = pod["containers"]
    env = _pod_env(k8s, publish)
    assert env["REDIS_URL"] and env["LMA_SERVE_RELOAD_CHANNEL"]
    script = publish["command"][-1]
    assert re.fullmatch(r'redis-cli -u "\$REDIS_URL" PUBLISH "\$LMA_SERVE_RELOAD_CHANNEL" (\S+)',
                        script).group(1) == name
    assert publish["image"] == compose["services"]["redis"]["image"]


def test_kserve_inference_service(k8s):
    isvc = k8s[("InferenceService", "lma-ctr")]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    (c,) = isvc["spec"]["predictor"]["containers"]
    assert c["name"] == "kserve-container"
    assert c["command"] == ["lma", "serve"] and c["args"] == ["/mnt/models"]
    env = _env(c)
    assert env["STORAGE_URI"].startswith("pvc://lma-bundles")
    port = c["ports"][0]["containerPort"]
    assert str(port) == env["LMA_SERVE_PORT"] == "8080"
    assert _probe_path(c, "readinessProbe") == READY and _probe_path(c, "livenessProbe") == LIVE
    assert c["readinessProbe"]["httpGet"]["port"] == port
    assert c["resources"]["limits"]["cpu"]


def _settings_env_names() -> tuple[set[str], set[str]]:
    """Every environment name service.settings.ServeSettings reads, and the subset that is
    online state shared through Redis (the Redis URL, the feature store, the prediction cache,
    the reload channel and folder watch): what replicas must agree on."""
    try:
        from service.settings import ServeSettings
    except ImportError as exc:
        pytest.skip(f"service.settings is not importable ({exc})")
    from pydantic import AliasChoices

    prefix = ServeSettings.model_config["env_prefix"]
    names, shared = set(), set()
    for field, info in ServeSettings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            envs = {c for c in alias.choices if isinstance(c, str) and c.isupper()}
        elif isinstance(alias, str):
            envs = {alias.upper()}
        else:
            envs = {(prefix + field).upper()}
        names |= envs
        if field == "redis_url" or field.startswith(("feature", "cache", "reload", "watch")):
            shared |= envs
    return names, shared


def _replica_envs(k8s: dict, compose: dict) -> dict[str, dict[str, str]]:
    out = {f"compose {n}": {k: str(v) for k, v in compose["services"][n]["environment"].items()}
           for n in ("api", "api-gpu")}
    for name in ("lma-api", "lma-api-gpu"):
        out[f"k8s {name}"] = _pod_env(k8s, _container(k8s[("Deployment", name)]))
    (c,) = k8s[("InferenceService", "lma-ctr")]["spec"]["predictor"]["containers"]
    out["kserve lma-ctr"] = _pod_env(k8s, c)
    return out


def _replica_problems(envs: dict[str, dict[str, str]], names: set[str],
                      shared: set[str]) -> list[str]:
    problems = []
    for where, env in envs.items():
        ours = {k for k in env if k.startswith(("LMA_SERVE_", "LMA_ADMIN")) or k in shared}
        if unknown := ours - names:
            problems.append(f"{where}: {sorted(unknown)} are not settings of service/settings.py")
        if "REDIS_URL" not in env:
            problems.append(f"{where}: no REDIS_URL")
    for key in sorted(shared):
        values = {where: env.get(key) for where, env in envs.items()}
        if any(v is not None for v in values.values()) and len(set(values.values())) > 1:
            problems.append(f"{key} differs between replicas: {values}")
    return problems


def test_replicas_share_the_online_state_settings(k8s, compose):
    """Every replica definition (compose api and api-gpu, the CPU and GPU Deployments, the KServe
    predictor) sets only environment names the service really reads, and the online-state ones
    (the same Redis for features, cache and reload messages) to the same values everywhere; the
    Redis they name is the Redis service of compose and of deploy/k8s."""
    names, shared = _settings_env_names()
    assert "REDIS_URL" in shared
    envs = _replica_envs(k8s, compose)
    assert _replica_problems(envs, names, shared) == []
    url = envs["compose api"]["REDIS_URL"]
    host = re.match(r"redis://([\w.-]+):6379/\d+$", url).group(1)
    assert host in compose["services"] and ("Service", host) in k8s


def test_replica_settings_check_catches_drift(k8s, compose):
    """The check above fails on a misspelt setting, a replica without Redis, and replicas that
    name different Redis servers."""
    names, shared = _settings_env_names()
    envs = _replica_envs(k8s, compose)
    typo = {**envs, "k8s lma-api": {**envs["k8s lma-api"], "LMA_SERVE_MAX_BATCH_ROW": "64"}}
    assert any("LMA_SERVE_MAX_BATCH_ROW" in p for p in _replica_problems(typo, names, shared))
    other = {**envs, "kserve lma-ctr": {**envs["kserve lma-ctr"], "REDIS_URL": "redis://x:6379/0"}}
    assert any("REDIS_URL differs" in p for p in _replica_problems(other, names, shared))
    gone = {**envs, "compose api-gpu": {k: v for k, v in envs["compose api-gpu"].items()
                                        if k != "REDIS_URL"}}
    assert any("no REDIS_URL" in p for p in _replica_problems(gone, names, shared))


def test_probe_paths_are_served_by_the_app():
    """The v2 health routes the probes use are routes of the real app (needs service/ on main)."""
    try:
        from service.main import app
    except ImportError as exc:
        pytest.skip(f"service.main is not importable yet ({exc})")
    paths = app.openapi()["paths"]
    assert "get" in paths[READY] and "get" in paths[LIVE]
    healthcheck = (REPO / "docker" / "healthcheck.py").read_text()
    assert "127.0.0.1:{port}" + READY in healthcheck, "the image's HEALTHCHECK asks readiness"


# ---- the prebuilt native op -----------------------------------------------------------------------


def test_prebuilt_native_op_loads_read_only_without_a_compiler(tmp_path):
    """What the serving images do: import the op compiled at build time, write nothing."""
    pytest.importorskip("torch")
    from lma.ops import _native

    built = _native.build_dir() / f"{_native.EXT_NAME}.so"
    if not built.is_file():
        pytest.skip(f"no compiled op at {built} (run python -m lma.ops.build)")
    ext_dir = tmp_path / "torch_ext"
    ext_dir.mkdir()
    shutil.copy2(built, ext_dir / built.name)
    ext_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    script = textwrap.dedent(
        """
        import torch
        from lma.ops import _native
        from lma.ops.reference import HashedGatherConfig, slot_indices_torch
        ext = _native.native_module()
        assert ext is not None, _native.native_error()
        cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=1 << 12)
        a, b, w = cfg.param_tensors()
        keys = torch.randint(-(1 << 62), 1 << 62, (101,), dtype=torch.int64)
        got = ext.slot_indices(keys, a, b, w, cfg.m, cfg.z, True, False)
        assert torch.equal(got, slot_indices_torch(keys, (a, b, w), cfg))
        """
    )
    env = dict(
        os.environ,
        LMA_TORCH_EXT_DIR=str(ext_dir),
        LMA_TORCH_EXT_PREBUILT="1",
        CXX="/nonexistent/c++",
        PATH="/nonexistent",
        PYTHONPATH=str(REPO),
    )
    env.pop("LMA_DISABLE_NATIVE_OPS", None)
    try:
        res = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
        )
    finally:
        ext_dir.chmod(0o755)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in ext_dir.iterdir()) == [built.name], "nothing written"

    env["LMA_TORCH_EXT_DIR"] = str(tmp_path / "empty")
    res = subprocess.run(
        [sys.executable, "-c", "from lma.ops import _native; m = _native.native_module();"
         "print(m is None, _native.native_error())"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("True") and "does not exist" in res.stdout
