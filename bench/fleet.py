"""Many models on one machine, measured against `kvbox serve` processes on dummy weights at a real shape.

  cycles       N sleep/wake cycles of one model at a level: host RSS (server and engines) and GPU memory after the
               first cycle and after the last (a leak shows as growth), seconds per sleep and per wake, and whether
               the greedy answer stayed the same.
  wake         time to first token of a request that wakes its model from level 1 and from level 2, broken down
               into the wake (as the server measured it: room made, weights copied back or loaded, KV cache, CUDA
               graphs) and the rest (the first token itself), next to the TTFT of an awake model.
  round-robin  requests cycling over 4 models with max_active_models 2 (every request finds its model asleep):
               req/s and TTFT p50/p99 at sleep level 1 and level 2, next to restarting one single-model server per
               model in 2 slots, least recently used out (what llama-swap does).

  python bench/fleet.py wake --shape llama-3.1-8b --json out.json          # the GPU figures
  python bench/fleet.py round-robin --shape tiny --device cpu --requests 4  # bounded, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SHAPES, random_prompts, shape_folder  # noqa: E402

ADMIN_KEY = "bench-admin-key"
ROOT = Path(__file__).resolve().parents[1]


def model_spec(args, name: str, folder: str, **extra) -> dict:
    kv = {"num_blocks": args.num_kv_blocks} if args.device == "cpu" else {"memory_bytes": int(args.kv_gib * 2**30)}
    return {"name": name, "source": folder, "load_format": "dummy", "device": args.device,
            "dtype": SHAPES[args.shape]["torch_dtype"], "max_model_len": args.input_len + args.output_len,
            "kv_cache": {"prefix_caching": False, **kv}, "scheduler": {"max_num_seqs": 4}, **extra}


class Server:
    """One `kvbox serve` process on a config of our own; `url` once ready."""

    def __init__(self, models: list[dict], timeout_s: float, **server):
        self.workdir = Path(tempfile.mkdtemp(prefix="kvbox-fleet-bench-"))
        config = {"server": {"port": 0, "admin_keys": [ADMIN_KEY], **server}, "ui": {"enabled": False},
                  "models": models}
        (self.workdir / "config.yaml").write_text(yaml.safe_dump(config))
        self.log = self.workdir / "server.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "appliance.server", str(self.workdir / "config.yaml")],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while not (match := re.search(r"API:\s+(http://\S+)/v1", self.log.read_text(errors="replace"))):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"kvbox serve did not start; log:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        self.url = match.group(1)
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def admin(self, path: str, **params) -> dict:
        response = self.http.post(path, params=params)
        response.raise_for_status()
        return response.json()

    def model(self, name: str) -> dict:
        return {m["name"]: m for m in self.http.get("/admin/models").json()["models"]}[name]

    def rss_bytes(self) -> int:
        """The server's resident memory and its engine processes'."""
        return sum(_rss(pid) for pid in [self.process.pid, *_children(self.process.pid)])

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:  # what the server said is what explains a failed request
            body = error.response.text if isinstance(error, httpx.HTTPStatusError) else ""
            print(f"{error!r} {body}\nserver log:\n{self.log.read_text(errors='replace')[-6000:]}", file=sys.stderr)
        self.stop()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in map(int, (task / "children").read_text().split()):
                found += [child, *_children(child)]
    return found


def _rss(pid: int) -> int:
    with contextlib.suppress(OSError):
        match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        return int(match.group(1)) * 1024 if match else 0
    return 0


def gpu_used_bytes() -> int | None:
    """The device's used memory as nvidia-smi reports it (every process's), None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out.split()[0]) * 2**20


def complete(http: httpx.Client, model: str, prompt: list[int], max_tokens: int) -> tuple[float, str]:
    """(seconds to the first streamed token, the text) of one greedy completion."""
    start, ttft, text = time.perf_counter(), None, []
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        if response.is_error:
            response.read()  # the error's body, for the report
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ttft = ttft if ttft is not None else time.perf_counter() - start
                text += [c["text"] for c in json.loads(line[6:])["choices"]]
    return ttft, "".join(text)


def run_cycles(args, prompt: list[int]) -> dict:
    with Server([model_spec(args, "m", args.folder)], args.timeout) as server:
        # The engine loads its grammar tokenizer in the background after it is ready: a structured request waits
        # for that load, so the memory measured from here on does not grow by it.
        server.http.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 1,
                                                  "structured_outputs": {"regex": ".+"}}).raise_for_status()
        expected = complete(server.http, "m", prompt, args.output_len)[1]
        sleep_s, wake_s, identical, memory = [], [], True, {"awake_rss_bytes": server.rss_bytes()}
        for cycle in range(args.cycles):
            started = time.perf_counter()
            asleep = server.admin("/admin/models/m/sleep", level=args.level)
            sleep_s.append(time.perf_counter() - started)
            if cycle == 0:
                memory["asleep_rss_bytes"] = server.rss_bytes()
            started = time.perf_counter()
            server.admin("/admin/models/m/wake")
            wake_s.append(time.perf_counter() - started)
            identical &= complete(server.http, "m", prompt, args.output_len)[1] == expected
            if cycle == 0 or cycle == args.cycles - 1:  # after the first cycle: what every later one reuses
                memory["first" if cycle == 0 else "last"] = {"rss_bytes": server.rss_bytes(),
                                                             "gpu_used_bytes": gpu_used_bytes(),
                                                             "asleep": asleep["memory"]}
        first, last = memory["first"], memory["last"]
        return {"level": args.level, "cycles": args.cycles, "identical": identical,
                "awake_rss_bytes": memory["awake_rss_bytes"], "asleep_rss_bytes": memory["asleep_rss_bytes"],
                "after_first": first,
                "after_last": last, "rss_growth_bytes": last["rss_bytes"] - first["rss_bytes"],
                "gpu_growth_bytes": (last["gpu_used_bytes"] - first["gpu_used_bytes"]
                                     if first["gpu_used_bytes"] is not None else None),
                "sleep_s_median": statistics.median(sleep_s), "wake_s_median": statistics.median(wake_s)}


def run_wake(args, prompt: list[int]) -> dict:
    with Server([model_spec(args, "m", args.folder)], args.timeout) as server:
        complete(server.http, "m", prompt, 1)  # compiles what the first request compiles
        awake = statistics.median(complete(server.http, "m", prompt, 1)[0] for _ in range(args.reps))
        result = {"awake_ttft_s": awake}
        for level in (1, 2):
            rows = []
            for _ in range(args.reps):
                server.admin("/admin/models/m/sleep", level=level)
                ttft = complete(server.http, "m", prompt, 1)[0]
                wake = server.model("m")["last_wake_s"]
                rows.append({"ttft_s": ttft, "wake_s": wake, "first_token_s": ttft - wake})
            result[f"level_{level}"] = {**{key: statistics.median(r[key] for r in rows) for key in rows[0]},
                                        "wake_s_each": [r["wake_s"] for r in rows]}
        # The engine logs each wake's phases (memory mapped, weights copied, graphs kept or captured).
        result["engine_wake_log"] = [line.split("INFO", 1)[-1].strip() for line in
                                     server.log.read_text(errors="replace").splitlines() if "wake: " in line]
        return result


def _rr_report(ttfts: list[float], seconds: float) -> dict:
    ordered = sorted(ttfts)
    return {"requests_per_s": len(ttfts) / seconds, "ttft_p50_s": statistics.median(ordered),
            "ttft_p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]}


def run_round_robin(args, prompt: list[int]) -> dict:
    names = [f"m{i}" for i in range(args.models)]
    result = {}
    for level in [int(s[-1]) for s in args.systems if s.startswith("level")]:
        models = [model_spec(args, name, args.folder, load="on_demand", sleep_level=level) for name in names]
        with Server(models, args.timeout, max_active_models=args.max_active) as server:
            # Each started, then put to sleep and woken once (a first wake captures the CUDA graphs): the timed
            # rounds measure steady swaps, not first starts.
            for name in names * 2:
                complete(server.http, name, prompt, 1)
            started, ttfts = time.perf_counter(), []
            for i in range(args.requests):
                ttfts.append(complete(server.http, names[i % len(names)], prompt, args.output_len)[0])
            result[f"kvbox_sleep_level_{level}"] = _rr_report(ttfts, time.perf_counter() - started)
            _progress(result)
    if "restarts" in args.systems:
        result["restart_processes"] = _round_robin_restarts(args, names, prompt)
    return result


def _progress(result: dict) -> None:
    """Each system's row as soon as it is measured: on 8B shapes the whole round-robin takes minutes (every model's
    first start, then 10-20 s a swap at level 2 or by restart), and a time limit must not lose the rows before it."""
    print("so far: " + json.dumps(result), file=sys.stderr, flush=True)


def _round_robin_restarts(args, names: list[str], prompt: list[int]) -> dict:
    """One single-model server per running model, at most `max_active` of them; a request for another stops the
    least recently used and starts its own (its TTFT includes the start)."""
    running: OrderedDict[str, Server] = OrderedDict()
    started, ttfts = time.perf_counter(), []
    try:
        for i in range(args.requests):
            name = names[i % len(names)]
            begin = time.perf_counter()
            if name not in running:
                if len(running) >= args.max_active:
                    running.popitem(last=False)[1].stop()
                running[name] = Server([model_spec(args, name, args.folder)], args.timeout)
            running.move_to_end(name)
            sent = time.perf_counter()
            ttfts.append(sent - begin + complete(running[name].http, name, prompt, args.output_len)[0])
    finally:
        for server in running.values():
            server.stop()
    return _rr_report(ttfts, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["cycles", "wake", "round-robin"])
    parser.add_argument("--shape", default="llama-3.1-8b", help=f"tiny, or one of {sorted(SHAPES)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--level", type=int, choices=[1, 2], default=1, help="cycles: the sleep level")
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3, help="wake: measurements per level")
    parser.add_argument("--requests", type=int, default=16, help="round-robin: requests per system")
    parser.add_argument("--systems", nargs="+", choices=["level1", "level2", "restarts"],
                        default=["level1", "level2", "restarts"], help="round-robin: which to run")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--max-active", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--kv-gib", type=float, default=4.0, help="each model's KV cache on a GPU")
    parser.add_argument("--num-kv-blocks", type=int, default=64, help="each model's KV cache on the CPU")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    args.shape = "tiny-llama" if args.shape == "tiny" else args.shape
    args.folder = shape_folder(args.shape)
    prompt = random_prompts(1, args.input_len, SHAPES[args.shape]["vocab_size"])[0]
    result = {"mode": args.mode, "shape": args.shape, "device": args.device,
              **{"cycles": run_cycles, "wake": run_wake, "round-robin": run_round_robin}[args.mode](args, prompt)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
