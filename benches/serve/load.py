#!/usr/bin/env python3
"""Closed-loop load generator for an OpenAI-compatible completions server.

STREAMS threads each send REQUESTS_PER_STREAM requests one after another to
POST {url}/v1/completions (greedy, not streamed, max_tokens fixed), all threads
starting together. One warm-up request goes first and is not timed. The result is
one JSON line on stdout:

    tokens_per_s    sum(usage.completion_tokens) / wall time of the timed phase
    mean_request_s  mean time from sending a request to having its whole answer

Standard library only (Python 3.11+), so it runs against any server with nothing
installed. Any failed request makes the run fail (exit status 1).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

# Short prompts of varied kinds (roughly 50 to 80 tokens each). Each one stops in the
# middle of a sentence, so that a small instruct model used without a chat template
# keeps writing instead of ending at once (there is no ignore_eos); with SmolLM2-135M
# all but two run to 128 tokens. Request j of stream i uses prompt
# (i * requests_per_stream + j) mod len(PROMPTS), so concurrent streams start on
# different prompts.
PROMPTS = [
    "The lighthouse keeper had not seen a ship in eleven days. On the twelfth morning, "
    "a small boat with a red sail appeared on the horizon, drifting without oars. He "
    "took his old brass telescope from the shelf, climbed the spiral stairs two at a "
    "time, and when he finally looked through the glass he saw",
    "A hash map finds a value by its key in roughly constant time, while searching an "
    "unsorted list means comparing the key with every element in turn. To see why the "
    "difference matters, imagine a phone book with a million entries. With a list, a "
    "program looking for one name would",
    "Dear Mrs. Okafor,\n\nI hope you are keeping well. I am writing because I will be "
    "away visiting my sister for the whole second week of August, and I was wondering "
    "whether you might be able to water the tomato plants on my balcony while I am gone. "
    "They need",
    "Before a long bicycle ride in the mountains, it is worth spending ten minutes on a "
    "few checks. First, the tyres: they should be pumped to the pressure printed on the "
    "side wall and free of cuts. Second, the brakes, because on a long descent",
    "A train leaves the station at 9:40 and travels at a steady 80 kilometres per hour. "
    "A second train leaves the same station at 10:10 on a parallel track at 100 "
    "kilometres per hour. By 10:10 the first train has been travelling for half an hour, "
    "so it is already 40 kilometres ahead. The second train gains",
    "At six in the morning the bakery on the corner is already warm and loud. The first "
    "trays of loaves come out of the big oven with a hiss of steam, the radio in the back "
    "plays an old song that nobody listens to, and the baker, flour up to her elbows,",
    "The water cycle is the journey water takes around our planet, again and again. It "
    "starts when the sun warms the sea, lakes and rivers, and some of the water turns "
    "into an invisible gas called water vapour. This is called evaporation. Next,",
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists of integers into one sorted "
    "list without calling sort().\n\n    Walks both lists with one index each and always "
    "takes the smaller head element.\n    \"\"\"\n    result = []\n    i = 0\n    j = 0\n",
    "Working from home has changed the daily routine of millions of people. It saves "
    "hours of commuting every week and gives people more control over their time, but "
    "many workers say they feel isolated from their colleagues. In this essay I will look "
    "at the main advantages and drawbacks, beginning with the most obvious one:",
    "The sentence 'The meeting was postponed because half of the team had caught a cold' "
    "can be translated into French as 'La réunion a été reportée parce que la moitié de "
    "l'équipe avait attrapé un rhume.' A few words deserve a closer look. First, the verb",
    "Simple vegetable soup (serves four). Ingredients: two carrots, one onion, one large "
    "potato, a stick of celery, a litre of vegetable stock, olive oil, salt and pepper.\n\n"
    "Method: Peel the carrots and the potato and cut them into small cubes. Chop the "
    "onion and the celery, then",
    "Why is the sky blue during the day but red and orange at sunset? The answer has to "
    "do with how sunlight is scattered by the tiny molecules of gas in the air. Sunlight "
    "looks white, but it is really a mixture of all the colours of the rainbow, and",
    "Nobody in the house could remember when the cat first decided that the vacuum "
    "cleaner was a dragon. Every Saturday, as soon as the cupboard door opened, he "
    "flattened his ears, puffed up his tail to twice its size and took up his position "
    "at the end of the hallway, where",
    "A small shop sells notebooks for 3 euros each and pens for 1.50 euros each. Maria "
    "buys four notebooks and some pens and pays 18 euros in total. To find out how many "
    "pens she bought, we first work out how much she spent on notebooks: four notebooks "
    "at 3 euros cost",
    "Meeting new people at a party can feel awkward, but keeping a conversation going is "
    "a skill anyone can learn. The most useful habit is to ask open questions, the kind "
    "that cannot be answered with a simple yes or no. For example, instead of asking",
    "Libraries and search engines both help people find information, but they work in "
    "very different ways. A library is a curated collection: every book on its shelves "
    "was chosen by someone, catalogued, and placed where it can be found again. A search "
    "engine, by contrast,",
]


class RequestError(Exception):
    pass


class Client:
    """One keep-alive HTTP connection per thread; reconnects once if it was dropped."""

    def __init__(self, base_url: str, timeout: float):
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https"):
            raise SystemExit(f"load.py: --url must start with http:// or https://, got {base_url!r}")
        self.scheme = parsed.scheme
        self.netloc = parsed.netloc
        self.prefix = parsed.path.rstrip("/")
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.netloc, timeout=self.timeout)

    def post_json(self, path: str, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = self._connect()
            try:
                self.conn.request("POST", self.prefix + path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A kept-alive connection the server closed meanwhile: retry on a new one.
                self.close()
                if attempt == 1:
                    raise
                continue
            if resp.will_close:
                self.close()
            if resp.status != 200:
                raise RequestError(f"HTTP {resp.status}: {data[:500].decode(errors='replace')}")
            try:
                return json.loads(data)
            except ValueError as e:
                raise RequestError(f"response is not JSON ({e}): {data[:200]!r}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def completion(client: Client, model: str, prompt: str, max_tokens: int) -> tuple[int, int]:
    """Sends one request; returns (prompt_tokens, completion_tokens)."""
    answer = client.post_json(
        "/v1/completions",
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": False,
        },
    )
    usage = answer.get("usage")
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        raise RequestError(f"response has no usage.completion_tokens: {json.dumps(answer)[:300]}")
    return int(usage.get("prompt_tokens") or 0), usage["completion_tokens"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", required=True, help="model name sent in each request")
    ap.add_argument("--streams", type=int, default=1, help="concurrent clients (default 1)")
    ap.add_argument("--requests-per-stream", type=int, default=4, help="sequential requests per client (default 4)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for one answer (default 600)")
    ap.add_argument("--label", default="", help="free text copied into the result line")
    args = ap.parse_args()
    if args.streams < 1 or args.requests_per_stream < 1 or args.max_tokens < 1:
        ap.error("--streams, --requests-per-stream and --max-tokens must be at least 1")

    warm = Client(args.url, args.timeout)
    try:
        completion(warm, args.model, PROMPTS[-1], args.max_tokens)
    except Exception as e:  # noqa: BLE001 - reported, then the run fails
        print(f"load.py: warm-up request failed: {e}", file=sys.stderr)
        return 1
    finally:
        warm.close()

    n, k = args.streams, args.requests_per_stream
    latencies: list[list[float]] = [[] for _ in range(n)]
    tokens: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    errors: list[str] = []
    errors_lock = threading.Lock()
    start_line = threading.Barrier(n + 1)

    def stream(i: int) -> None:
        client = Client(args.url, args.timeout)
        try:
            start_line.wait()
            for j in range(k):
                prompt = PROMPTS[(i * k + j) % len(PROMPTS)]
                t0 = time.perf_counter()
                tokens[i].append(completion(client, args.model, prompt, args.max_tokens))
                latencies[i].append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            with errors_lock:
                errors.append(f"stream {i}: {type(e).__name__}: {e}")
        finally:
            client.close()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    start_line.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    if errors:
        for e in errors:
            print(f"load.py: {e}", file=sys.stderr)
        return 1

    all_lat = [x for per in latencies for x in per]
    completion_tokens = sum(c for per in tokens for _, c in per)
    prompt_tokens = sum(p for per in tokens for p, _ in per)
    result = {
        "label": args.label,
        "url": args.url,
        "model": args.model,
        "streams": n,
        "requests": len(all_lat),
        "max_tokens": args.max_tokens,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "mean_completion_tokens": round(completion_tokens / len(all_lat), 2),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(completion_tokens / wall, 2),
        "mean_request_s": round(statistics.fmean(all_lat), 4),
        "max_request_s": round(max(all_lat), 4),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
