#!/usr/bin/env python3
"""Render the chat-template test cases the way Hugging Face transformers does.

Reads `cases.json` (beside this script) and the `<template>.jinja` files it names, renders
every case with jinja2 configured exactly as transformers' `apply_chat_template` configures
it (`transformers/utils/chat_template_utils.py`, `_compile_jinja_template`), and rewrites
`cases.json` with each case's `expected` output filled in, or, when the template calls
`raise_exception(...)`, with `error` set to that message and `expected` set to null.

The jinja2 set-up copied from transformers:

* `jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
  extensions=[AssistantTracker, jinja2.ext.loopcontrols])`; no autoescape, no
  `keep_trailing_newline`, the default `Undefined`.
* `AssistantTracker`: the `{% generation %}...{% endgeneration %}` tag, which renders its body
  unchanged (transformers only records where the body lies when asked for an assistant mask).
* The `tojson` filter replaced by `json.dumps(x, ensure_ascii=False, indent=indent,
  separators=separators, sort_keys=sort_keys)`, so no HTML escaping and Python's `", "` and
  `": "` separators.
* Globals `raise_exception(message)`, raising `jinja2.exceptions.TemplateError(message)`, and
  `strftime_now(format)`.
* `template.render(messages=..., tools=..., documents=..., add_generation_prompt=...,
  bos_token=..., eos_token=...)`; `tools` and `documents` are None when absent.

One difference, for reproducibility: transformers' `strftime_now` formats the wall clock; here
it formats the instant `SOURCE_DATE_EPOCH` (2026-01-01T00:00:00Z) in UTC. chord's test runs
with the environment variable SOURCE_DATE_EPOCH set to the same value.

chord's test (Rust, minijinja-based) renders the same cases and compares its output with
`expected` byte for byte; for an error case it checks that its error message contains `error`.

Run from the repository root (needs jinja2 >= 3.1 from PyPI, `pip install jinja2`):

    python3 tests/data/templates/make_expected.py          # rewrite cases.json
    python3 tests/data/templates/make_expected.py --check  # only report differences

Only errors raised by `raise_exception` are recorded as expected errors; any other failure
(a syntax error, an undefined variable used wrongly, a type error) stops the script, since it
means a template or a case is broken.
"""

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
from jinja2.exceptions import TemplateError

# 2026-01-01T00:00:00Z: the instant `strftime_now` formats (instead of the wall clock).
SOURCE_DATE_EPOCH = 1767225600

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases.json"
KEYS = [
    "name",
    "template",
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "expected",
    "error",
]


class AssistantTracker(jinja2.ext.Extension):
    """transformers' `{% generation %}` tag; outside assistant-mask tracking it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _generation_support(self, context, caller):
        return caller()


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces jinja2's tojson, which escapes HTML characters and sorts keys.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.fromtimestamp(SOURCE_DATE_EPOCH, timezone.utc).strftime(format)


def environment():
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[AssistantTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render(env, templates, case):
    """(expected, error) for one case."""
    name = case["template"]
    if name not in templates:
        templates[name] = env.from_string((HERE / f"{name}.jinja").read_text(encoding="utf-8"))
    try:
        out = templates[name].render(
            messages=case["messages"],
            tools=case["tools"],
            documents=case["documents"],
            add_generation_prompt=case["add_generation_prompt"],
            bos_token=case["bos_token"],
            eos_token=case["eos_token"],
        )
    except TemplateError as e:
        # raise_exception raises TemplateError itself; its subclasses (UndefinedError,
        # TemplateSyntaxError, ...) mean the template or the case is broken.
        if type(e) is not TemplateError:
            raise
        return None, e.message
    return out, None


def main():
    check = "--check" in sys.argv[1:]
    cases = json.loads(CASES.read_text(encoding="utf-8"))
    env = environment()
    templates = {}
    names = set()
    out = []
    changed = 0
    for case in cases:
        if case["name"] in names:
            sys.exit(f"duplicate case name {case['name']!r}")
        names.add(case["name"])
        expected, error = render(env, templates, case)
        if (expected, error) != (case.get("expected"), case.get("error")):
            changed += 1
            print(f"{'differs' if check else 'updated'}: {case['name']}")
        case["expected"], case["error"] = expected, error
        out.append({k: case.get(k) for k in KEYS})
    if check:
        sys.exit(1 if changed else 0)
    CASES.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(out)} cases, {changed} updated, {sum(c['error'] is not None for c in out)} errors")


if __name__ == "__main__":
    main()
