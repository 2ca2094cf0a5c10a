"""Chat templates are the model author's code (issue 15, group 5): one that does not parse is
refused at compile; one that fails or breaks a limit while rendering fails that one render with a
line naming the file, and a chat goes on; normal templates render as Jinja renders them."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgellm.errors import EdgeLLMError
from edgellm.runtime import chat_template
from edgellm.runtime.chat_template import ChatTemplate

CLI = [sys.executable, "-m", "edgellm.cli"]
CHATML = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|im_start|>system\\n' + m['content'] "
          "+ '<|im_end|>\\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + '<|im_end|>\\n' }}"
          "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}{% endfor %}"
          "{{ '%-6s|%3d' % ('n', messages|length) }}{{ '{:>4}'.format(loop_count|default(7)) }}{{ big * 3 }}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]


def test_a_normal_template_renders_as_jinja_renders_it():
    values = dict(messages=MESSAGES, add_generation_prompt=True, bos_token="<s>", big=10**12)
    expected = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHATML).render(**values)
    assert ChatTemplate(CHATML, "t.json").render(**values) == expected


@pytest.mark.parametrize("source, needle", [
    ("{{ 'a' * 10**10 }}", "10000000000 x 1 items"),
    ("{{ 'a' * 1000000 * 1000 }}", "1000 x 1000000 items"),
    ("{{ [0] * 100000000 }}", "100000000 x 1 items"),
    ("{{ 7 ** 100000 }}", "7 ** 100000"),
    ("{{ 'x'|center(1000000000) }}", "filter center the number 1000000000"),
    ("{{ 'x'.ljust(1000000000) }}", "ljust the number 1000000000"),
    ("{{ '%1000000000d' % 1 }}", "field 1000000000 characters wide"),
    ("{{ '%1000000000d'|format(1) }}", "field 1000000000 characters wide"),
    ("{{ '{:>1000000000}'.format(1) }}", "field 1000000000 characters wide"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}", "MB"),
    ("{% set ns = namespace(x=[1]) %}{% for i in range(60) %}{% set ns.x = ns.x + ns.x %}{% endfor %}", "MB"),
    ("{{ raise_exception('no system role here') }}", "failed on these messages: ValueError: no system role here"),
    ("{{ messages[10]['content'] }}", "failed on these messages"),
])
def test_a_template_that_breaks_a_limit_fails_its_render_with_one_line(source, needle):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EdgeLLMError, match="^t.json: the chat template ") as caught:
        ChatTemplate(source, "t.json").render(messages=MESSAGES)
    assert needle in str(caught.value) and "\n" not in str(caught.value)
    # the step that broke the limit was refused, not taken (ru_maxrss: KiB on Linux)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 2 * chat_template.MEMORY_LIMIT


def test_a_template_that_runs_too_long_is_stopped(monkeypatch):
    monkeypatch.setattr(chat_template, "TIME_LIMIT", 0.5)
    start = time.monotonic()
    with pytest.raises(EdgeLLMError, match="ran for more than 0.5 s"):
        ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "t.json").render(messages=MESSAGES)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("source, needle", [("{% for m in messages %}", "does not parse"),
                                            (["not", "text"], "is a list, not text")])
def test_a_template_that_does_not_parse_is_named(source, needle):
    with pytest.raises(EdgeLLMError, match=f"^t.json: the chat template {needle}"):
        ChatTemplate(source, "t.json")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny_models import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("template") / "model")


def test_compile_refuses_a_template_that_does_not_parse(tiny_model, tmp_path):
    import shutil

    model = shutil.copytree(tiny_model, tmp_path / "model")
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if messages %}{{ x }"}))
    run = subprocess.run(CLI + ["compile", str(model), "-o", str(tmp_path / "out"), "--target", "cpu",
                                "--max_num_tokens", "64", "--future_token_mask_size", "64", "--language_group_size", "16"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"{model}: the chat template does not parse" in run.stderr
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


def test_a_failing_render_ends_the_turn_not_the_chat(tiny_model, tmp_path, fp32_plan):
    from conftest import build

    out = build(tiny_model, tmp_path / "out", fp32_plan, target="cpu", max_num_tokens=64, language_group_size=16,
                future_token_mask_size=64)
    settings = json.loads((out / "runtime" / "runtime_config.json").read_text())
    settings["chat_template"] = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}"
                                 "{% endif %}{{ m['content'] }} {% endfor %}")
    (out / "runtime" / "runtime_config.json").write_text(json.dumps(settings))
    run = subprocess.run(CLI + ["chat", str(out), "-n", "2"], input="boom\nw1 w2\n/quit\n", capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "failed on these messages: ValueError: no boom" in run.stderr and "Traceback" not in run.stderr
    assert "tokens/s" in run.stderr  # the second turn was answered


def test_a_forked_process_measures_its_own_memory():
    """The memory limit reads /proc/self/statm through a descriptor kept open; a process forked
    after it was opened (a compile worker, a server's) must read its own, not its parent's."""
    import os

    if chat_template._resident() is None:  # (opens the descriptor in this process)
        pytest.skip("no /proc/self/statm on this system: the memory limit is off here")
    pid = os.fork()
    if pid == 0:
        import mmap

        before = chat_template._resident()
        grown = mmap.mmap(-1, 300 << 20)  # fresh pages (not free heap the parent left resident), each touched
        for offset in range(0, len(grown), mmap.PAGESIZE):
            grown[offset] = 1
        os._exit(0 if chat_template._resident() - before > 250 << 20 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
