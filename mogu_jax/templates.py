"""Prompt templates of the published MoGU code (MOGU_SPEC.md section 2) and prompt encoding.

The named templates are byte-for-byte the strings the authors' ``inf_mogu.py`` scripts format; the
response follows the template directly. Models whose tokenizer ships a chat template use it when no
named template is asked for; otherwise the raw instruction is the prompt.

Templates that start with ``<s>`` already contain the BOS token as text: :func:`encode_prompt`
tokenizes them without adding a second BOS (the published code calls the tokenizer with
``add_special_tokens=False``).
"""

from __future__ import annotations

from typing import Optional

from mogu_jax.errors import MoguError

# Meta's default Llama-2 system prompt, verbatim (as in the published MoGU code and Meta's reference).
LLAMA2_DEFAULT_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)

VICUNA_DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)

# name -> (format string with {system} and {instruction}, default system prompt or None)
TEMPLATES: dict[str, tuple[str, Optional[str]]] = {
    "llama2-chat": ("<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{instruction}[/INST]", LLAMA2_DEFAULT_SYSTEM),
    "vicuna": ("<s> {system} USER: {instruction} ASSISTANT:", VICUNA_DEFAULT_SYSTEM),
    "falcon": ("User: {instruction}\n\nAssistant:", None),
}


def template_names() -> list[str]:
    return sorted(TEMPLATES)


def apply_template(template: str, instruction: str, system: Optional[str] = None) -> str:
    """Format ``instruction`` with a named template (``system`` replaces the default system prompt)."""
    try:
        fmt, default_system = TEMPLATES[template]
    except KeyError:
        raise MoguError(f"unknown prompt template {template!r}; known templates: {', '.join(template_names())}") from None
    if default_system is None:
        if system:
            # Falcon-instruct has no system slot; put the system text on its own line before the turn.
            return f"{system}\n" + fmt.format(instruction=instruction)
        return fmt.format(instruction=instruction)
    return fmt.format(system=default_system if system is None else system, instruction=instruction)


def has_chat_template(tokenizer) -> bool:
    return bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, instruction: str, template: Optional[str] = None, system: Optional[str] = None) -> str:
    """The prompt text for one instruction.

    ``template`` names one of :data:`TEMPLATES`; without it the tokenizer's chat template is used (user turn,
    generation prompt added), and without a chat template the raw instruction is the prompt.
    """
    if template is not None:
        return apply_template(template, instruction, system)
    if has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": instruction}]
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja errors (e.g. a template that rejects system turns)
            raise MoguError(f"the tokenizer's chat template failed: {e}") from None
    return instruction if not system else f"{system}\n\n{instruction}"


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's BOS unless the text already starts with the BOS string.

    Never appends an EOS (some tokenizers are configured with ``add_eos_token``); the prompt is
    continued by generation.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos_id = getattr(tokenizer, "eos_token_id", None)
    eos = getattr(tokenizer, "eos_token", None)
    if ids and eos_id is not None and ids[-1] == eos_id and not (eos and text.endswith(eos)):
        ids = ids[:-1]
    return ids
