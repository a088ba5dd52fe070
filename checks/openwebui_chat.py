"""Open WebUI itself against ChatStream: a chat typed into its page in Chromium gets the model's
answer, with Open WebUI's default settings. Run it through `scripts/check_openwebui.sh`, which
makes Open WebUI's venv first.

What it does, each step bounded in time and printed:
1. `serve run` ChatStream (the embedded SmolLM2 on the transformers engine, or `--engine mock`
   in echo mode, whose answer is the question itself) on a free loopback port;
2. a recording pass-through proxy in front of it (checks/recording_proxy.py), so the check
   shows every request Open WebUI sent;
3. `open-webui serve` on a free loopback port: OPENAI_API_BASE_URL at the proxy's /v1,
   OFFLINE_MODE=true, WEBUI_AUTH=False, DATA_DIR in a temporary folder, nothing else set;
4. Debian's Chromium (Playwright) opens Open WebUI's page, picks the model, types the question,
   waits for the answer and checks it is the model's;
5. stops everything it started, by pid, and writes a report (JSON) with versions, timings, the
   answer and the fields of each request Open WebUI sent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checks.recording_proxy import RecordingProxy, summarize  # noqa: E402
from serve_app.local_server import LocalServe, free_port  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]
QUESTION = "What is the capital of France?"
CHAT_PATH = "/v1/chat/completions"


def say(message: str) -> None:
    print(f"[openwebui-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


class CheckFailed(RuntimeError):
    """The check failed; the message says what to do next."""


def wait_http_ok(url: str, deadline: float, proc: subprocess.Popen, log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CheckFailed(f"open-webui exited with {proc.returncode}; see its log {log}")
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise CheckFailed(f"open-webui did not answer {url} in time; see its log {log}")


@contextlib.contextmanager
def open_webui(
    binary: Path, api_base: str, data_dir: Path, log: Path, timeout_s: float
) -> Iterator[str]:
    """`open-webui serve` on a free loopback port, its own process group, stopped by pid."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_"))}
    env.update(
        OPENAI_API_BASE_URL=api_base,
        OPENAI_API_KEY="unused",  # ChatStream without CHATSTREAM_API_KEYS needs none
        OFFLINE_MODE="true",
        WEBUI_AUTH="False",
        DATA_DIR=str(data_dir),
        HF_HUB_OFFLINE="1",
        ANONYMIZED_TELEMETRY="False",
        DO_NOT_TRACK="true",
        SCARF_NO_ANALYTICS="true",
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(binary), "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=data_dir,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http_ok(url + "/health", time.monotonic() + timeout_s, proc, log)
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # our own process group only
                    proc.wait()


def chat_in_browser(
    url: str, model: str, question: str, artifacts: Path, timeout_s: float
) -> dict[str, Any]:
    """Open Open WebUI's page, pick `model`, send `question`; the answer text and timings."""
    from playwright.sync_api import expect, sync_playwright

    timings: dict[str, float] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            started = time.monotonic()
            page.goto(url + "/")
            chat_input = page.locator("#chat-input")
            expect(chat_input).to_be_visible(timeout=120_000)
            timings["page_ready_s"] = round(time.monotonic() - started, 1)
            dismiss_dialogs(page)
            pick_model(page, model)
            page.screenshot(path=str(artifacts / "openwebui-before.png"))
            chat_input.click()
            page.keyboard.type(question)
            sent = time.monotonic()
            page.keyboard.press("Enter")
            answer = wait_answer(page, question, time.monotonic() + timeout_s)
            timings["answer_s"] = round(time.monotonic() - sent, 1)
            page.screenshot(path=str(artifacts / "openwebui-answer.png"), full_page=True)
            return {"answer": answer, "timings": timings, "page_errors": errors}
        finally:
            browser.close()


def dismiss_dialogs(page) -> None:
    """Close a first-visit dialog (release notes) if one covers the page."""
    for name in ("Okay, Let's Go!", "Close"):
        button = page.get_by_role("button", name=name)
        with contextlib.suppress(Exception):
            if button.first.is_visible(timeout=2_000):
                button.first.click()


def pick_model(page, model: str) -> None:
    """Select `model` in the model selector unless the page already shows it."""
    selector = page.get_by_role("button", name=re.compile("Select a model|" + re.escape(model)))
    if page.get_by_text(model, exact=True).first.is_visible():
        return
    selector.first.click()
    page.get_by_role("button", name=re.compile(re.escape(model))).first.click()


def wait_answer(page, question: str, deadline: float) -> str:
    """The last assistant message's text once it has stopped changing for 3 s (and the page
    shows no stop button): streaming is over."""
    container = page.locator("#response-content-container").last
    last, stable_since = None, time.monotonic()
    while time.monotonic() < deadline:
        text = container.inner_text(timeout=5_000).strip() if container.count() else ""
        if text != last:
            last, stable_since = text, time.monotonic()
        elif text and time.monotonic() - stable_since >= 3:
            return text
        time.sleep(0.5)
    raise CheckFailed(
        f"no finished answer in time (last text: {last!r}); see the screenshots and logs"
    )


def package_version(python: Path, name: str) -> str:
    out = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--openwebui", type=Path, required=True, help="the open-webui executable")
    parser.add_argument("--engine", choices=["transformers", "mock"], default="transformers")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--artifacts", type=Path, default=ROOT / "test-artifacts" / "openwebui")
    parser.add_argument("--answer-timeout", type=float, default=1200.0)
    parser.add_argument("--startup-timeout", type=float, default=420.0)
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        raise CheckFailed(
            "Debian's Chromium is missing: apt-get update && apt-get install -y chromium"
        )
    args.artifacts.mkdir(parents=True, exist_ok=True)
    venv_python = args.openwebui.with_name("python")
    report: dict[str, Any] = {
        "versions": {
            "open-webui": package_version(venv_python, "open-webui"),
            "torch (open-webui venv)": package_version(venv_python, "torch"),
            "playwright": package_version(Path(sys.executable), "playwright"),
            "chromium": subprocess.run(
                [str(CHROMIUM), "--version"], capture_output=True, text=True, timeout=60
            ).stdout.strip(),
        },
        "engine": args.engine,
        "question": args.question,
        "timings": {},
    }
    serve_args: dict[str, Any] = {"engine": args.engine}
    if args.engine == "mock":
        # Open WebUI's default chat offers 36 built-in tools (~3,000 prompt tokens in the
        # Hermes format): more than the mock's default context of 2048 (SmolLM2 has 8192).
        serve_args.update(mock_mode="echo", mock_time_per_token_sec=0.05, max_context_tokens=8192)
    model = "mock" if args.engine == "mock" else "SmolLM2-135M-Instruct"
    t0 = time.monotonic()
    say(f"starting `serve run` ({args.engine} engine); the log goes to {args.artifacts}/serve.log")
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(
            LocalServe(
                serve_args,
                startup_timeout_s=args.startup_timeout,
                log_path=args.artifacts / "serve.log",
            )
        )
        report["timings"]["service_start_s"] = round(time.monotonic() - t0, 1)
        say(f"service ready at {service.url} in {report['timings']['service_start_s']} s")
        proxy = stack.enter_context(RecordingProxy(service.url))
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="openwebui-data-")))
        t1 = time.monotonic()
        say(f"starting open-webui (DATA_DIR {data_dir}); log: {args.artifacts}/openwebui.log")
        webui = stack.enter_context(
            open_webui(
                args.openwebui,
                proxy.url + "/v1",
                data_dir,
                args.artifacts / "openwebui.log",
                args.startup_timeout,
            )
        )
        report["timings"]["openwebui_start_s"] = round(time.monotonic() - t1, 1)
        say(
            f"open-webui ready at {webui} in {report['timings']['openwebui_start_s']} s; "
            "driving Chromium"
        )
        try:
            result = chat_in_browser(
                webui, model, args.question, args.artifacts, args.answer_timeout
            )
            # Open WebUI's background tasks (title, tags, follow-ups) come after the answer.
            if not proxy.wait_idle(quiet_s=5, timeout_s=args.answer_timeout):
                say("Open WebUI's requests were still running when the wait ended")
        finally:
            report["requests"] = summarize(proxy.records)
            (args.artifacts / "requests.json").write_text(
                json.dumps(proxy.records, indent=1, default=str)
            )
        report["answer"] = result["answer"]
        report["timings"].update(result["timings"])
        report["page_errors"] = result["page_errors"]
        say(f"answer: {result['answer']!r}")
    report["timings"]["total_s"] = round(time.monotonic() - t0, 1)
    report["result"] = verdict(report, args.engine, args.question)
    (args.artifacts / "report.json").write_text(json.dumps(report, indent=1))
    say(f"report: {args.artifacts}/report.json")
    print(json.dumps(report, indent=1))
    if report["result"] != "pass":
        raise CheckFailed(report["result"])
    say("PASS: Open WebUI's page got the model's answer through ChatStream")
    return 0


def verdict(report: dict[str, Any], engine: str, question: str) -> str:
    """'pass', or what is wrong."""
    chats = [r for r in report["requests"] if r["path"].startswith(CHAT_PATH)]
    if not chats:
        return f"Open WebUI sent no request to {CHAT_PATH}: see requests.json and openwebui.log"
    failed = [r for r in chats if r["status"] != 200]
    if failed:
        return f"the service refused Open WebUI's request(s): {failed}; see requests.json"
    answer = report.get("answer", "")
    if not answer:
        return "the page shows an empty answer"
    if engine == "mock" and question not in answer:
        return f"the answer is not the mock's echo of the question: {answer!r}"
    return "pass"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckFailed as exc:
        say(f"FAIL: {exc}")
        sys.exit(1)
