"""`kvbox chat` against the real server: a turn streams a reply, errors are shown, an empty line ends it."""

import subprocess
import sys

from helpers_server import API_KEY

pytest_plugins = ["helpers_server"]


def run_chat(api_server, *args, stdin):
    return subprocess.run([sys.executable, "-m", "appliance.cli", "chat", *args, "--url", api_server.base_url],
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_chat_streams_replies_and_keeps_the_conversation(api_server):
    result = run_chat(api_server, "qwen", "--api-key", API_KEY, "--max-tokens", "6", "--temperature", "0",
                      stdin="Hello there\nAnd again\n\n")
    assert result.returncode == 0, result.stderr
    replies = [line.split("qwen> ", 1)[1] for line in result.stdout.splitlines() if "qwen> " in line]
    # Two turns; the tiny random model may well end its second reply at once, so only the first must say something.
    assert len(replies) == 2 and replies[0].strip()


def test_chat_reports_errors_and_goes_on(api_server):
    result = run_chat(api_server, "no-such-model", "--api-key", API_KEY, stdin="Hi\n\n")
    assert result.returncode == 0
    assert "404" in result.stderr and "does not exist" in result.stderr
    denied = run_chat(api_server, "qwen", "--api-key", "wrong", stdin="Hi\n\n")
    assert "401" in denied.stderr
