"""The serving image, checked without a Docker engine: hadolint, the stages as parsed by
dockerfile-parse, the build context as Docker computes it from .dockerignore (docker-py's
implementation), and the builder stage's wheel built here the way the stage builds it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from docker.utils.build import PatternMatcher, exclude_paths
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy import helpers
from tests.deploy.helpers import DOCKER_DIR, DOCKERFILE, DOCKERIGNORE, REPO

# import names of the distributions in the extras, where they differ
IMPORT_NAMES = {"scikit-learn": "sklearn"}


# --- parsing ------------------------------------------------------------------------------


def stages() -> dict[str, list[dict]]:
    """{stage name: its instructions (FROM first)}, comments left out."""
    out: dict[str, list[dict]] = {}
    current = None
    for ins in DockerfileParser(path=str(DOCKERFILE)).structure:
        if ins["instruction"] == "FROM":
            current = shlex.split(ins["value"])[-1]
            out[current] = []
        if current is not None and ins["instruction"] != "COMMENT":
            out[current].append(ins)
    return out


def instructions(stage: list[dict], name: str) -> list[str]:
    return [ins["value"] for ins in stage if ins["instruction"] == name]


def global_args() -> dict[str, str]:
    args = {}
    for ins in DockerfileParser(path=str(DOCKERFILE)).structure:
        if ins["instruction"] == "FROM":
            break
        if ins["instruction"] == "ARG":
            key, _, value = ins["value"].partition("=")
            args[key] = value
    return args


def env_of(stage: list[dict]) -> dict[str, str]:
    values = {}
    for value in instructions(stage, "ENV"):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            values[key] = val
    return values


def copies(stage: list[dict]) -> list[tuple[str | None, list[str], str]]:
    """(--from stage or None, sources, destination) of each COPY."""
    out = []
    for value in instructions(stage, "COPY"):
        words = shlex.split(value)
        source_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
        paths = [w for w in words if not w.startswith("--")]
        out.append((source_stage, paths[:-1], paths[-1]))
    return out


def final_stage() -> list[dict]:
    return list(stages().values())[-1]


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def extras_packages() -> set[str]:
    """Distribution names of the optional dependencies (torch and the like): those that are
    neither serving dependencies nor needed to build the wheel (grpcio-tools)."""
    data = helpers.pyproject()
    project = data["project"]
    needed = project["dependencies"] + data["build-system"]["requires"]
    keep = {canonicalize_name(Requirement(r).name) for r in needed}
    names = {
        canonicalize_name(Requirement(r).name)
        for reqs in project["optional-dependencies"].values()
        for r in reqs
    }
    return names - keep - {canonicalize_name(project["name"])}


# --- lint ---------------------------------------------------------------------------------


def test_hadolint_finds_nothing():
    out = helpers.run_tool(["hadolint", "--no-color", DOCKERFILE])
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_does_report_a_bad_dockerfile(tmp_path):
    # the check above means something only if this hadolint lints at all
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    out = helpers.run_tool(["hadolint", "--no-color", bad])
    assert out.returncode != 0
    assert "DL3006" in out.stdout and "DL3015" in out.stdout, out.stdout


# --- stages -------------------------------------------------------------------------------


def test_base_image_is_a_cuda_runtime_with_cudnn_and_a_build_argument():
    base = global_args()["BASE_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", base), base
    # every stage starts from it, directly or through the shared python stage
    parents = DockerfileParser(path=str(DOCKERFILE)).parent_images
    names = list(stages())
    assert parents[0] == base
    assert all(p == base or p in names for p in parents)


def test_onnxruntime_pin_is_built_for_the_cuda_of_the_base_image():
    """The pinned onnxruntime-gpu links the CUDA runtime of one major version; read which
    from the NEEDED entries of the installed wheel's CUDA provider library, when the venv
    has that version."""
    from importlib import metadata

    pinned = constraints()["onnxruntime-gpu"]
    installed = metadata.version("onnxruntime-gpu")
    if installed != pinned:
        pytest.skip(f"venv has onnxruntime-gpu {installed}, the image pins {pinned}")
    files = metadata.distribution("onnxruntime-gpu").files
    (provider,) = [f for f in files if f.name == "libonnxruntime_providers_cuda.so"]
    out = helpers.run_tool(["readelf", "--dynamic", Path(provider.locate())])
    assert out.returncode == 0, out.stderr
    linked = set(re.findall(r"\(NEEDED\).*\[libcudart\.so\.(\d+)\]", out.stdout))
    cuda_major = re.search(r"nvidia/cuda:(\d+)\.", global_args()["BASE_IMAGE"]).group(1)
    assert linked == {cuda_major}, (linked, cuda_major)


def test_final_stage_runs_trex_serve_as_a_non_root_user():
    stage = final_stage()
    (user,) = instructions(stage, "USER")
    uid, _, gid = user.partition(":")
    # numeric, so Kubernetes can check runAsNonRoot without the image's passwd
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    (entrypoint,) = instructions(stage, "ENTRYPOINT")
    assert entrypoint.strip() == '["trex-serve"]'  # exec form: the server gets SIGTERM
    scripts = helpers.pyproject()["project"]["scripts"]
    assert scripts["trex-serve"] == "service.server:main"


def test_exposed_ports_are_the_ports_the_server_listens_on():
    stage = final_stage()
    env = env_of(stage)
    exposed = {p for value in instructions(stage, "EXPOSE") for p in value.split()}
    assert exposed == {env["TREX_PORT"], env["TREX_METRICS_PORT"]}
    assert env["TREX_HOST"] == "0.0.0.0"


def test_healthcheck_asks_the_grpc_health_service():
    stage = final_stage()
    (check,) = instructions(stage, "HEALTHCHECK")
    assert 'CMD ["python", "/app/healthcheck.py"]' in check
    assert ("deploy/docker/healthcheck.py", "/app/healthcheck.py") in {
        (src, dest) for _, srcs, dest in copies(stage) for src in srcs
    }


def test_final_stage_copies_only_the_venv_the_probe_and_the_models():
    copied = copies(final_stage())
    assert sorted(copied, key=str) == sorted(
        [
            ("builder", ["/opt/venv"], "/opt/venv"),
            (None, ["deploy/docker/healthcheck.py"], "/app/healthcheck.py"),
            (None, ["models/onnx/"], "/app/models/onnx/"),
        ],
        key=str,
    )
    env = env_of(final_stage())
    assert env["TREX_MODEL_DIR"] == "/app/models/onnx"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_no_stage_installs_training_dependencies():
    banned = extras_packages()
    assert "torch" in banned  # the check below means something
    for name, stage in stages().items():
        for run in instructions(stage, "RUN"):
            words = set(re.findall(r"[A-Za-z0-9_.\-\[\]]+", run))
            assert not {canonicalize_name(w) for w in words} & banned, (name, run)
            assert not re.search(r"\.\[|\[(train|dev|analysis)\]", run), (name, run)


# --- pins ---------------------------------------------------------------------------------


def constraints() -> dict[str, str]:
    pins = {}
    for line in (DOCKER_DIR / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: constraints pin exact versions"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_constraints_pin_every_serving_and_build_dependency_within_pyproject():
    pins = constraints()
    data = helpers.pyproject()
    needed = data["project"]["dependencies"] + data["build-system"]["requires"]
    for line in needed:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/docker/constraints.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} violates {line}"
    assert not set(pins) & extras_packages(), "a training/analysis package is pinned"


def test_build_requirements_are_the_build_system_requirements():
    listed = {
        canonicalize_name(Requirement(line).name)
        for line in (DOCKER_DIR / "build-requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    }
    required = {
        canonicalize_name(Requirement(r).name)
        for r in helpers.pyproject()["build-system"]["requires"]
    }
    assert listed == required


# --- build context ------------------------------------------------------------------------


def context_files() -> set[str]:
    return exclude_paths(str(REPO), dockerignore_patterns(), dockerfile="Dockerfile")


def test_build_context_leaves_out_environments_data_and_tests():
    included = context_files()
    for path in included:
        top = path.split("/")[0]
        assert top not in {".venv", ".git", "runs", "tests", "training", "export", "analysis"}, path
        assert "__pycache__" not in path and not path.endswith(".pyc"), path
        assert not re.search(r"_pb2(_grpc)?\.pyi?$", path), f"stale generated stub {path}"
    # checkpoints and data next to the models are not shipped, whatever their name
    matcher = PatternMatcher(dockerignore_patterns())
    for path in ["models/trex.pt", "data/train.jsonl", ".cache/x", "runs/a.log", "notebook.ipynb"]:
        assert matcher.matches(path), f"{path} would be sent to the docker daemon"


def test_every_copy_source_is_in_the_build_context():
    included = context_files()
    matcher = PatternMatcher(dockerignore_patterns())
    for stage in stages().values():
        for source_stage, sources, _ in copies(stage):
            if source_stage is not None:
                continue
            for source in sources:
                source = source.rstrip("/")
                if source.endswith("*"):  # optional (README.md*)
                    continue
                if source == "models/onnx":
                    # the export may not be in this checkout; the folder must not be ignored
                    assert not matcher.matches("models/onnx/manifest.json")
                    assert not matcher.matches("models/onnx/compiler.onnx")
                    continue
                assert source in included, f"COPY {source}: left out of the build context"


# --- the builder stage --------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the builder stage: its COPY sources (as the context has them) laid out
    in a scratch /src, built with the stage's pip wheel flags, by this venv's setuptools and
    grpcio-tools instead of the pinned ones."""
    for module in ("setuptools", "grpc_tools"):
        try:
            __import__(module)
        except ImportError:
            pytest.fail(f"{module} is missing from the venv: {helpers.SETUP_HINT}")
    src = tmp_path_factory.mktemp("src")
    included = context_files()
    builder = stages()["builder"]
    (workdir,) = instructions(builder, "WORKDIR")
    for source_stage, sources, dest in copies(builder):
        assert source_stage is None and dest.startswith(workdir)
        for source in sources:
            for path in sorted(REPO.glob(source.rstrip("/"))):
                rel = path.relative_to(REPO).as_posix()
                if rel not in included:
                    continue
                target = src / dest[len(workdir) :].strip("/")
                if path.is_dir():
                    shutil.copytree(
                        path,
                        target,
                        ignore=lambda d, names, base=path: [
                            n
                            for n in names
                            if (Path(d) / n).relative_to(REPO).as_posix() not in included
                        ],
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)
    (build,) = [r for r in instructions(builder, "RUN") if " wheel " in r]
    flags = [w for w in shlex.split(build) if w.startswith("--") and w != "--wheel-dir"]
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", *flags, "--wheel-dir", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (built,) = dist.glob("trex_serve-*.whl")
    return built


def test_builder_wheel_holds_the_service_and_freshly_generated_stubs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "service/server.py",
        "service/runtime.py",
        "protos/trex/v1/trex.proto",
        "protos/trex/v1/trex_pb2.py",
        "protos/trex/v1/trex_pb2_grpc.py",
    ):
        assert needed in names, f"{needed} is not in the image's wheel"
    packages = {n.split("/")[0] for n in names if not n.startswith("trex_serve-")}
    assert packages == {"service", "protos"}, "the image's wheel carries more than the service"


def test_builder_wheel_needs_nothing_from_the_extras(wheel):
    with zipfile.ZipFile(wheel) as whl:
        metadata = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        lines = whl.read(metadata).decode().splitlines()
    base = [
        Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")
    ]
    unconditional = {canonicalize_name(r.name) for r in base if r.marker is None}
    assert unconditional, "no dependencies at all: the metadata was not read"
    assert not unconditional & extras_packages()


def test_serving_code_runs_without_any_extra_installed(model_dir):
    """What the image's venv lacks (torch, onnx, ... from the extras) cannot be imported in a
    child interpreter; the service, the health probe and the load script still import, and
    the runtime loads the model and answers."""
    blocked = sorted(IMPORT_NAMES.get(n, n.replace("-", "_")) for n in extras_packages())
    code = f"""
import importlib.util, sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
import service.server, service.client
for path in ({str(helpers.HEALTHCHECK)!r}, {str(helpers.LOAD_SCRIPT)!r}):
    spec = importlib.util.spec_from_file_location("m", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
from service.runtime import Runtime
runtime = Runtime({str(model_dir)!r}, provider="cpu")
print(len(runtime.generate(runtime.encode(["12+34="]))[0]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 1
