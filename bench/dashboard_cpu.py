"""What the dashboard's own polling costs the server at idle: a server as config.example.yaml sets it up (keys, the
dashboard on), one tiny model, first left alone, then with the dashboard open in headless Chromium; the server
process's CPU time (psutil) over each span gives the share of one core (the least of three spans each), and their
difference the dashboard's cost.

    python bench/dashboard_cpu.py --seconds 60 [--json out.json]

tests/test_dashboard_operator.py runs a bounded version (15 s) in CI and holds the cost under 1% of a core.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ADMIN_KEY = "sk-bench-admin-key"


def cpu_share(pid: int, seconds: float, during=None) -> float:
    """The process's CPU time over `seconds` of wall time, as a fraction of one core."""
    process = psutil.Process(pid)
    before, start = process.cpu_times(), time.monotonic()
    (during or time.sleep)(seconds)
    after, wall = process.cpu_times(), time.monotonic() - start
    return ((after.user - before.user) + (after.system - before.system)) / wall


def least_share(pid: int, seconds: float, windows: int, during=None) -> tuple[float, list[float]]:
    """The smallest share over `windows` consecutive spans of `seconds / windows`, and all of them: what other
    processes do to this one (a shared 2-core machine's scheduling, its caches) only ever adds CPU time, so the
    least span is the closest to the steady cost."""
    shares = [cpu_share(pid, seconds / windows, during) for _ in range(windows)]
    return min(shares), [round(share, 5) for share in shares]


def measure(base_url: str, pid: int, admin_key: str, seconds: float, baseline_s: float, windows: int = 3) -> dict:
    """Idle with no client, then idle with the dashboard open (logged in, the log view live) in headless Chromium;
    each in `windows` spans, of which the least counts."""
    from playwright.sync_api import sync_playwright

    idle, idle_spans = least_share(pid, baseline_s, windows)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(f"{base_url}/ui")
            page.fill("#key", admin_key)
            page.click("button[type=submit]")
            # Until the login's navigation lands, the page is the login form's, which has no window.kvbox.
            page.wait_for_function("() => window.kvbox?.updates > 1 && window.kvboxLogs?.polls > 0")
            updates = page.evaluate("window.kvbox.updates")
            # The page's timers run while the browser waits (sleeping here would suspend no page, but play safe).
            dashboard, dashboard_spans = least_share(pid, seconds, windows, lambda s: page.wait_for_timeout(s * 1000))
            updates = page.evaluate("window.kvbox.updates") - updates
            mode = page.evaluate("window.kvbox.mode")
        finally:
            browser.close()
    return {"idle_cpu_share": idle, "dashboard_cpu_share": dashboard, "dashboard_cost": dashboard - idle,
            "idle_spans": idle_spans, "dashboard_spans": dashboard_spans, "seconds": seconds,
            "baseline_seconds": baseline_s, "page_updates": updates, "page_mode": mode}


def example_config(model_dir: str) -> dict:
    """config.example.yaml's server, with keys set and one tiny model on the CPU."""
    config = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    config["server"].update({"port": 0, "api_keys": ["sk-bench-api-key"], "admin_keys": [ADMIN_KEY]})
    config["models"] = [{"name": "tiny", "source": model_dir, "device": "cpu", "dtype": "float32",
                         "kv_cache": {"num_blocks": 256}}]
    return config


def serve(config: dict, workdir: Path) -> tuple[subprocess.Popen, str]:
    path, log = workdir / "kvbox.yaml", workdir / "server.log"
    path.write_text(yaml.safe_dump(config))
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "appliance.server", str(path)], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if match := re.search(r"API:\s+(http://\S+)/v1", log.read_text(errors="replace")):
            base_url = match.group(1)
            while httpx.get(f"{base_url}/ready").status_code != 200:
                time.sleep(0.2)
            return process, base_url
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="seconds with the dashboard open")
    parser.add_argument("--baseline-seconds", type=float, default=30, help="seconds idle without it, first")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    from engine.tools.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model("llama", Path(tmp) / "model")
        process, base_url = serve(example_config(str(model)), Path(tmp))
        try:
            time.sleep(5)  # past the start's own work
            result = measure(base_url, process.pid, ADMIN_KEY, args.seconds, args.baseline_seconds)
        finally:
            process.terminate()
            process.wait(60)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
