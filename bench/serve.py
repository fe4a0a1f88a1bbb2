"""Load check for ``ftcli serve``: N concurrent HTTP clients for a bounded time, against a
classifier and a chat model, beside the same requests answered one at a time in process
(``Predictor.classify`` / ``Predictor.generate``, the ``ftcli predict`` path) on the same machine.

    python bench/serve.py --classifier runs/quickstart --chat runs/smollm2-chat-lora
    python bench/serve.py --classifier runs/quickstart --clients 8 --seconds 30

Each model is a run folder (or any MODEL_OR_RUN ``ftcli serve`` takes); nothing is trained here.
Reports requests/s, p50/p95 latency and failures (any non-200 or malformed answer) for the server,
requests/s for the in-process loop, and the server's batching counts from /health. The two sides
alternate (server, in process, server, ...) so load from other jobs hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXTS = [
    "A gorgeous, moving film with a terrific cast.",
    "Dull, predictable and far too long.",
    "The script is sharp and the acting is even sharper.",
    "I kept checking my watch.",
    "An uneven but often delightful comedy.",
    "A tedious slog through familiar territory.",
    "Funny, warm and surprisingly wise.",
    "The plot makes no sense and the jokes fall flat.",
]
QUESTIONS = [
    "What is the capital of France?",
    "Tell me a joke.",
    "What do you like to do?",
    "Who are you?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftcli", "serve", model, "--port", str(port), *extra],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 600
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"the server did not come up in 600 s:\n{log.read_text()}")


def load(url: str, request, clients: int, seconds: float) -> dict:
    """``clients`` threads, each sending ``request(client, i)`` back to back for ``seconds``."""
    import httpx

    lat: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(c: int):
        with httpx.Client(base_url=url, timeout=300) as h:
            i = 0
            while time.perf_counter() < stop_at:
                path, body, ok = request(c, i)
                t0 = time.perf_counter()
                try:
                    r = h.post(path, json=body)
                    good = r.status_code == 200 and ok(r.json())
                    why = None if good else f"{r.status_code} {r.text[:200]}"
                except (httpx.HTTPError, ValueError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                dt = time.perf_counter() - t0
                with lock:
                    (failures.append(why) if why else lat.append(dt))
                i += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [float("nan")] * 19
    return {
        "requests": len(lat),
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "wall_s": wall,
        "req_per_s": len(lat) / wall,
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p95_s": q[18],
    }


def in_process(fn, seconds: float) -> dict:
    """One request at a time, in process, for ``seconds``."""
    n, t0 = 0, time.perf_counter()
    lat = []
    while time.perf_counter() - t0 < seconds:
        s = time.perf_counter()
        fn(n)
        lat.append(time.perf_counter() - s)
        n += 1
    wall = time.perf_counter() - t0
    return {"requests": n, "req_per_s": n / wall, "p50_s": statistics.median(lat)}


def case(name, model, extra, request, local_fn, args, log_dir) -> dict:
    from ftcli.serve.predictor import load_predictor

    proc, url = start_server(model, extra, log_dir / f"serve-{name}.log")
    try:
        import httpx

        model_id = httpx.get(url + "/v1/models").json()["data"][-1]["id"]
        pred = load_predictor(model)
        rounds = {"server": [], "in_process": []}
        load(url, request(model_id), 1, 2)  # warm up both sides
        local_fn(pred)(0)
        for r in range(args.rounds):
            for side in ("server", "in_process") if r % 2 == 0 else ("in_process", "server"):
                if side == "server":
                    rounds[side].append(load(url, request(model_id), args.clients, args.seconds))
                else:
                    rounds[side].append(in_process(local_fn(pred), args.seconds))
        health = httpx.get(url + "/health").json()
    finally:
        proc.kill()
        proc.wait(10)
    srv = rounds["server"]
    rps = statistics.median(x["req_per_s"] for x in srv)
    local = statistics.median(x["req_per_s"] for x in rounds["in_process"])
    return {
        "case": name,
        "model": model,
        "clients": args.clients,
        "server_req_per_s": rps,
        "server_p50_s": statistics.median(x["p50_s"] for x in srv),
        "server_p95_s": statistics.median(x["p95_s"] for x in srv),
        "server_requests": sum(x["requests"] for x in srv),
        "server_failures": sum(x["failures"] for x in srv),
        "first_failure": next((x["first_failure"] for x in srv if x["first_failure"]), None),
        "in_process_req_per_s": local,
        "in_process_p50_s": statistics.median(x["p50_s"] for x in rounds["in_process"]),
        "server_over_in_process": rps / local,
        "batches": health["batches"],
        "largest_batch": health["largest_batch"],
        "mean_batch": health["requests"] / max(1, health["batches"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--classifier", help="classification run (e.g. runs/quickstart)")
    ap.add_argument("--chat", help="causal LM run (e.g. runs/smollm2-chat-lora)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="per round and side")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    ap.add_argument("--max-tokens", type=int, default=16, help="chat answer length")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    if not args.classifier and not args.chat:
        ap.error(
            "name what to serve: --classifier RUN and/or --chat RUN "
            "(train them with: ftcli train quickstart; ftcli train smollm2-chat-lora)"
        )
    for m in (args.classifier, args.chat):
        if m and not m.startswith("pkg:") and not Path(m).exists():
            sys.exit(
                f"{m} does not exist: train it first (ftcli train RECIPE; ftcli recipes lists the bundled ones)"
            )
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    results = []
    batch = ["--max-batch-size", str(args.clients), "--max-queue", str(4 * args.clients)]
    if args.classifier:

        def classify_req(model_id):
            return lambda c, i: (
                "/v1/classify",
                {"model": model_id, "input": TEXTS[(c + i) % len(TEXTS)]},
                lambda j: len(j["data"]) == 1 and 0.0 <= j["data"][0]["score"] <= 1.0,
            )

        results.append(
            case(
                "classify",
                args.classifier,
                batch,
                classify_req,
                lambda pred: lambda n: pred.classify([TEXTS[n % len(TEXTS)]]),
                args,
                log_dir,
            )
        )
    if args.chat:
        mt = args.max_tokens

        def chat_req(model_id):
            return lambda c, i: (
                "/v1/chat/completions",
                {
                    "model": model_id,
                    "max_tokens": mt,
                    "messages": [{"role": "user", "content": QUESTIONS[(c + i) % len(QUESTIONS)]}],
                },
                lambda j: isinstance(j["choices"][0]["message"]["content"], str),
            )

        results.append(
            case(
                "chat",
                args.chat,
                [*batch, "--max-tokens", str(mt)],
                chat_req,
                lambda pred: (
                    lambda n: pred.generate(
                        [[{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]],
                        max_new_tokens=mt,
                    )
                ),
                args,
                log_dir,
            )
        )
    print(f"load average {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} CPUs")
    for r in results:
        print(
            f"{r['case']:8s} {r['clients']} clients: {r['server_req_per_s']:.2f} req/s, "
            f"p50 {r['server_p50_s'] * 1000:.0f} ms, p95 {r['server_p95_s'] * 1000:.0f} ms, "
            f"{r['server_failures']} failed of {r['server_requests'] + r['server_failures']}; "
            f"in process one at a time {r['in_process_req_per_s']:.2f} req/s "
            f"(p50 {r['in_process_p50_s'] * 1000:.0f} ms); server / in process "
            f"{r['server_over_in_process']:.2f}x; mean batch {r['mean_batch']:.1f} "
            f"(largest {r['largest_batch']})"
        )
        if r["first_failure"]:
            print(f"  first failure: {r['first_failure']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
